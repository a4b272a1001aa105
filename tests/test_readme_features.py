"""The README's "Steps, metrics, the best checkpoints, preemption" example runs as written."""

import os
import re

from tests.mp_util import REPO_ROOT
from tests.readme_example import run_readme_example


def test_readme_steps_example_runs_and_prints_what_it_says(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    example, done = run_readme_example("best_fn", tmp_path, "/tmp/readme-best",
                                       tmp_path / "run", env=env)
    assert done.returncode == 0, done.stderr
    # The values the README's comments claim, in order.
    claimed = re.findall(r"^print\(.*?\)  # (.*)$|^# (\{.*\})$", example, re.M)
    claimed = [a or b for a, b in claimed]
    assert done.stdout.splitlines() == claimed == [
        "[21, 31, 51] 51", "{'config': 'c0ffee', 'loss': 0.7, 'step': 51}", "[31, 51]"]
