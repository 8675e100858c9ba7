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


PAPERS = "APA|PPO|GAE|Ziegler|Stiennon|InstructGPT|AWR|ILQL|A-LoL|DPO|PRO|DeepSeekMath|GSPO|DAPO"
MARKER = rf"\b({PAPERS}) (eq\. \(\d+[a-z]?\)|Algorithm \d+, lines? \d+(?:[–-]\d+)?)"
SCRIPTS = ["ppo.py", "apa.py", "awr.py", "ilql.py", "alol.py", "dpo.py", "pro.py", "grpo.py"]


def equation_table():
    """The README's table of equations: (marker, file, line) for each place a row cites, from its cells
    `apa.py:123` and its last cell, the marker comment on those lines."""
    import re

    text = (ROOT / "README.md").read_text()
    table = text.split("<!-- equations -->")[1].split("\n\n")[1]
    rows = []
    for line in table.splitlines()[2:]:
        marker = re.findall(r"`([^`]+)`", line)[-1]
        for file, number in re.findall(r"`(\w+\.py):(\d+)`", line):
            rows.append((marker, file, int(number)))
    return rows


def code_markers():
    """Every numbered equation marker in a comment of the scripts: (marker, file, line)."""
    import re

    found = []
    for file in SCRIPTS:
        for number, line in enumerate((ROOT / file).read_text().splitlines(), 1):
            if "#" in line:
                found += [(m.group(0), file, number) for m in re.finditer(MARKER, line.split("#", 1)[1])]
    return found


def test_every_row_of_the_equation_table_points_at_the_line_that_implements_it():
    rows = equation_table()
    assert len(rows) >= 10, rows
    for marker, file, number in rows:
        line = (ROOT / file).read_text().splitlines()[number - 1]
        assert "#" in line and marker in line.split("#", 1)[1], f"README.md: {file}:{number} should hold `{marker}`"


def test_every_numbered_equation_marker_in_the_code_is_in_the_table():
    cited = {(file, number) for _, file, number in equation_table()}
    assert [m for m in code_markers() if (m[1], m[2]) not in cited] == []


def test_no_tuple_statements():
    """One statement per line: no expression statement that is a tuple (`a.f(), b.g()`), in the scripts and tests."""
    import ast

    found = []
    for path in sorted([*ROOT.glob("*.py"), *ROOT.glob("tests/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Tuple):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == [], "tuple statements (write one statement per line): " + ", ".join(found)
