"""The code is formatted and linted as .ruff.toml says (line length 120, import order, pyupgrade, bugbear ...), so
that every file reads the same way. Fix a failure with `ruff format . && ruff check --fix .`, then read the diff."""

import subprocess
import sys

from conftest import ROOT


def ruff(*args):
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_format_leaves_every_file_as_it_is():
    result = ruff("format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_check_finds_nothing():
    result = ruff("check", ".")
    assert result.returncode == 0, result.stdout + result.stderr
