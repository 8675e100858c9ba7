"""`./launch.sh bench` runs end to end on tiny settings of the built-in models and prints its table; no timing or
memory target is asserted, only that every number is there and finite, and that LoRA's memory floor is below full
fine-tuning's."""

import json
import math
import os
import re
import subprocess
import sys

from conftest import ROOT

COLUMNS = (
    "script",
    "variant",
    "rollout tok/s",
    "bare generate tok/s",
    "rollout ratio",
    "whole rollout ratio",
    "update tok/s",
    "bare loop tok/s",
    "update ratio",
    "peak above idle",
    "floor",
    "peak / floor",
    "gen / score / update",
)


def run_bench(tmp_path, *args):
    """Run `./launch.sh bench ARGS --json` with this test's python; return (table rows as dicts, the JSON record)."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
    }
    command = ["bash", str(ROOT / "launch.sh"), "bench", *args, "--json", str(tmp_path / "bench.json")]
    proc = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("machine: ") for line in lines), proc.stdout
    header = next(line for line in lines if line.startswith("| script |"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert all(any(c.startswith(name) for c in cells) for name in COLUMNS), header
    rows = []
    for line in lines[lines.index(header) :]:
        if not line:
            break  # the end of the main table (--live-memory's table follows)
        if line.startswith("| ppo |"):
            rows.append(dict(zip(cells, (c.strip() for c in line.strip("|").split("|")))))
    with open(tmp_path / "bench.json") as f:
        record = json.load(f)
    return rows, record


def check_row(row):
    """Every cell but the names holds finite numbers; the three time shares add up to 100 %."""
    for column, cell in row.items():
        if column in ("script", "variant"):
            continue
        numbers = [float(x) for x in re.findall(r"\d+(?:\.\d+)?", cell)]
        assert numbers and all(math.isfinite(x) for x in numbers), (column, cell)
    shares = [float(x) for x in re.findall(r"\d+", row["gen / score / update"])]
    assert len(shares) == 3 and 97 <= sum(shares) <= 103, row


def test_bench_prints_a_table_with_finite_ratios(builtin_path, tmp_path):
    """One variant, with --live-memory: each phase's growth of live tensors is reported beside its RSS growth."""
    rows, record = run_bench(
        tmp_path, "--batch-size", "4", "--max-new-tokens", "4", "--repeats", "1", "--scripts", "ppo", "--live-memory"
    )
    assert len(rows) == 1, rows
    assert rows[0]["variant"].startswith("full"), rows
    check_row(rows[0])
    result = record["results"][0]
    assert result["floor_bytes"] > 0
    assert set(result["phase_live_growth_bytes"]) == {"generation", "scoring", "update"}
    assert all(growth > 0 for growth in result["phase_live_growth_bytes"].values()), result
    assert set(result["phase_rss_growth_bytes"]) == {"loading", "generation", "scoring", "update"}
    # The tensors alive when the live pass's update starts: every model's weights and, after the memory pass's step,
    # AdamW's states of every trained parameter (gradients may be freed between steps)
    floor = result["floor"]
    assert result["phase_live_starts_above_idle_bytes"]["update"] >= floor["weights"] + floor["adamw_states"]


def test_live_growth_is_the_peak_of_the_tensors_a_call_allocates(monkeypatch):
    """benchmark.live_growth counts what a call holds alive at its peak, freed or not by its end: two 8 MiB tensors
    alive together, then one of 4 MiB after both are freed, peak 16 MiB (the profiler's own bookkeeping aside)."""
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    import benchmark

    def allocate():
        first = torch.ones(2 << 20)  # 8 MiB of float32
        second = torch.ones(2 << 20)
        total = float(first.sum() + second.sum())
        del first, second
        return torch.zeros(1 << 20), total  # 4 MiB, alive when the call returns

    (kept, total), peak = benchmark.live_growth(torch, allocate)
    assert total == 4 << 20
    assert kept.numel() == 1 << 20
    assert 16 << 20 <= peak < 17 << 20, peak


def test_bench_lora_and_unchunked_variants_report_memory_against_the_floor(builtin_path, tmp_path):
    """Three variants on the built-in models: the scoring chunked (2 rows) and unchunked (the 4 rows at once), and
    LoRA. Each row has its peak above the idle process, its floor and their ratio; LoRA holds no π_ref and no
    gradients or AdamW states of the weights, so its floor is smaller."""
    rows, record = run_bench(
        tmp_path,
        "--batch-size",
        "4",
        "--mini-batch-size",
        "2",
        "--max-new-tokens",
        "4",
        "--repeats",
        "1",
        "--scripts",
        "ppo",
        "--variants",
        "full",
        "unchunked",
        "lora",
        "--lora-r",
        "4",
    )
    assert [row["variant"].split()[0] for row in rows] == ["full", "unchunked", "lora"], rows
    for row in rows:
        check_row(row)
    results = {r["variant"]: r for r in record["results"]}
    assert results["full"]["forward_batch_size"] == 2
    assert results["unchunked"]["forward_batch_size"] == 4
    assert results["lora"]["lora_r"] == 4
    for r in results.values():
        assert r["floor_bytes"] > 0
        assert math.isfinite(r["peak_above_idle_bytes"])
        assert math.isfinite(r["peak_over_floor"])
        assert r["same_tokens"], r["variant"]
    assert results["lora"]["floor_bytes"] < results["full"]["floor_bytes"]
    assert results["lora"]["trainable_parameters"] < results["full"]["trainable_parameters"]
