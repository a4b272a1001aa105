"""The README's worked example runs as written (docs match the code)."""

import os
import re
import subprocess
import sys

from tests.mp_util import REPO_ROOT


def test_readme_worked_example_runs(tmp_path):
    readme = (REPO_ROOT / "README.md").read_text()
    example = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S)
                   if "emulate_cpu_devices" in b)
    # The example writes under /tmp/readme-demo; run it against a private copy of it.
    example = example.replace("/tmp/readme-demo", str(tmp_path))
    script = tmp_path / "example.py"
    script.write_text(example)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # it emulates its own
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-2:] == [
        str([str(tmp_path / "run" / f"ckpt-{n}") for n in (3, 4, 5)]),
        str(tmp_path / "run" / "ckpt-5"),
    ]
