"""The README's worked example runs as written (docs match the code)."""

import os

from tests.readme_example import run_readme_example


def test_readme_worked_example_runs(tmp_path):
    # The example writes under /tmp/readme-demo; run it against a private copy of it.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # it emulates its own
    _, done = run_readme_example("emulate_cpu_devices", tmp_path, "/tmp/readme-demo",
                                 tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-2:] == [
        str([str(tmp_path / "run" / f"ckpt-{n}") for n in (3, 4, 5)]),
        str(tmp_path / "run" / "ckpt-5"),
    ]
