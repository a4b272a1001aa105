"""The README's "Steps, metrics, the best checkpoints, preemption" example runs as written."""

import os
import re
import subprocess
import sys

from tests.mp_util import REPO_ROOT


def test_readme_steps_example_runs_and_prints_what_it_says(tmp_path):
    readme = (REPO_ROOT / "README.md").read_text()
    example = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S)
                   if "best_fn" in b)
    example = example.replace("/tmp/readme-best", str(tmp_path / "run"))
    script = tmp_path / "example.py"
    script.write_text(example)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # The values the README's comments claim, in order.
    claimed = re.findall(r"^print\(.*?\)  # (.*)$|^# (\{.*\})$", example, re.M)
    claimed = [a or b for a, b in claimed]
    assert done.stdout.splitlines() == claimed == [
        "[21, 31, 51] 51", "{'config': 'c0ffee', 'loss': 0.7, 'step': 51}", "[31, 51]"]
