"""What the distribution ships beyond code: PEP 561's py.typed, so users' type checkers
read the hints of dcheckpoint, mesh and launch."""

import subprocess
import sys
import zipfile

from tests.mp_util import REPO_ROOT


def test_the_wheel_ships_py_typed_for_every_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                    "-q", "-w", str(tmp_path), str(REPO_ROOT)], check=True, timeout=300,
                   capture_output=True)
    (wheel,) = tmp_path.glob("dcheckpoint-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"dcheckpoint/py.typed", "mesh/py.typed", "launch/py.typed"} <= names
    assert "dcheckpoint/_checkpoint.py" in names
