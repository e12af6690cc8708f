"""The client's public modules type-check in mypy's strict mode (pyproject.toml, [tool.mypy]): the types users
see in their editors and their own mypy runs (the package ships ``py.typed``) hold."""

from __future__ import annotations

import os
import subprocess
import sys

from nodes.cluster import REPO_ROOT


def test_the_public_modules_pass_mypy_strict():
    out = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental"], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Success: no issues found" in out.stdout


def test_the_package_says_it_is_typed():
    assert os.path.isfile(os.path.join(REPO_ROOT, "bus", "py.typed"))
