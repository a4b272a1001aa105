"""The README's worked example runs as written (docs match the code)."""

import os

from tests.readme_example import run_readme_example


def test_readme_worked_example_runs(tmp_path):
    # The example writes under /tmp/readme-demo; run it against a private copy of it.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # it emulates its own
    _, done = run_readme_example("a laptop pretending", tmp_path, "/tmp/readme-demo",
                                 tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-2:] == [
        str([str(tmp_path / "run" / f"ckpt-{n}") for n in (3, 4, 5)]),
        str(tmp_path / "run" / "ckpt-5"),
    ]


def test_readme_jax_example_saves_and_resumes_by_step(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    outputs = []
    for _ in range(2):  # the second run resumes from the first one's latest step
        _, done = run_readme_example("PytreeManager(", tmp_path, "/tmp/readme-jax",
                                     tmp_path, env=env)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout.splitlines())
    assert outputs[0][0] == "resumed from 0" and outputs[1][0] == "resumed from 5"
    assert outputs[0][-1].startswith("[3, 4, 5] ") and outputs[1][-1].startswith("[8, 9, 10] ")
    # The loss is a JAX scalar in the loop, a Python float in the metadata.
    assert float(outputs[1][-1].split()[-1]) > 0
