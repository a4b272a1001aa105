"""Runs one of the README's python examples as written, in a private directory."""

import re
import subprocess
import sys

from tests.mp_util import REPO_ROOT


def run_readme_example(marker: str, workdir, placeholder: str, target, *,
                       env: dict | None = None) -> tuple[str, subprocess.CompletedProcess]:
    """Runs the README's python block that contains ``marker`` in a fresh interpreter,
    from ``workdir``, with the example's ``placeholder`` path replaced by ``target``.

    Returns:
      (the block as run, the finished process) for the caller to check.
    """
    readme = (REPO_ROOT / "README.md").read_text()
    example = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if marker in b)
    example = example.replace(placeholder, str(target))
    script = workdir / "example.py"
    script.write_text(example)
    done = subprocess.run([sys.executable, str(script)], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300)
    return example, done
