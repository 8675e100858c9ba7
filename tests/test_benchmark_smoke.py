"""`./launch.sh bench` runs end to end on a tiny setting and prints its table; no timing is asserted."""
import math
import os
import re
import subprocess
import sys

from conftest import ROOT

COLUMNS = ("script", "rollout tok/s", "bare generate tok/s", "rollout ratio", "update tok/s", "bare loop tok/s",
           "update ratio", "peak memory", "gen / score / update")


def test_bench_prints_a_table_with_finite_ratios(builtin_path, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}  # this test's python
    proc = subprocess.run(["bash", str(ROOT / "launch.sh"), "bench", "--batch-size", "4", "--max-new-tokens", "4",
                           "--repeats", "1", "--scripts", "ppo", "--json", str(tmp_path / "bench.json")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("machine: ") for line in lines), proc.stdout
    header = next(line for line in lines if line.startswith("| script |"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert all(any(c.startswith(name) for c in cells) for name in COLUMNS), header
    rows = [line for line in lines if line.startswith("| ppo |")]
    assert len(rows) == 1, proc.stdout
    row = dict(zip(cells, (c.strip() for c in rows[0].strip("|").split("|"))))
    for column, cell in row.items():
        if column == "script":
            continue
        numbers = [float(x) for x in re.findall(r"\d+(?:\.\d+)?", cell)]
        assert numbers and all(math.isfinite(x) for x in numbers), (column, cell)
    shares = [float(x) for x in re.findall(r"\d+", row["gen / score / update"])]
    assert len(shares) == 3 and 97 <= sum(shares) <= 103, row
    assert (tmp_path / "bench.json").exists()
