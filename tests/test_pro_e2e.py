"""pro.py end to end on the built-in task (subprocesses, tiny settings): one process, two ranks under torchrun with
ZeRO-3 on preference rows (rankings of 2), resume, bad rankings with one-line errors, and a learning test."""

import json
import math
import os
import re

import pytest
from conftest import assert_resume_reproduces, error_line, read_run, run_pairs, run_script, timed, without_timings

TINY = "--total-steps 4 --mini-batch-size 4 --eval-every 2 --eval-prompts 8 --max-new-tokens 12".split()
EVAL_KEYS = ["eval/reward", "eval/gold_score", "eval/distinct_1", "eval/distinct_2", "eval/response_length"]
POLICY_KEYS = ["policy/loss", "policy/ranking_loss", "policy/sft_loss", "policy/ranking_accuracy"]


def _check(proc, output_dir, steps=4):
    assert "done in" in proc.stdout, proc.stdout
    run, records = read_run(output_dir)
    assert [r["step"] for r in records] == list(range(steps + 1))
    assert timed(records, "update", "iteration") == records[1:]  # seconds at every step, and of every evaluation:
    assert timed(records, "eval") == [r for r in records[1:] if "eval/reward" in r]
    for key in EVAL_KEYS + ["data/rankings", "data/candidates_mean", "data/tied_rankings"]:
        assert key in records[0], key
    for key in EVAL_KEYS + POLICY_KEYS:
        assert key in records[-1], key
    assert all(math.isfinite(v) for r in records for v in r.values())
    assert (run / "policy" / "config.json").exists() and (run / "policy" / "model.safetensors").exists()
    return records


def test_one_process_and_resume(builtin_path, tmp_path):
    """The built-in rankings of 4, cut to their 3 best; stopped at step 1 and resumed: the same numbers."""
    args = [*TINY, "--ranking-len", "3"]
    proc = run_script("pro.py", *args, "--output-dir", str(tmp_path / "run"), env={"OMP_NUM_THREADS": "1"})
    records = _check(proc, tmp_path / "run")
    assert "rankings of 3-3 candidates" in proc.stdout
    assert records[0]["data/candidates_mean"] == 3
    assert_resume_reproduces("pro.py", args, records, tmp_path, env={"OMP_NUM_THREADS": "1"})


def test_torchrun_two_ranks_zero3_preference_rows(builtin_path, tmp_path):
    """Two ranks under ZeRO-3, on the built-in preference rows: rankings of 2, rewards 1 and 0."""
    proc = run_script(
        "pro.py",
        *TINY,
        "--zero-stage",
        "3",
        "--offline-dataset",
        os.path.join(builtin_path, "data", "preference"),
        "--output-dir",
        str(tmp_path / "run"),
        nproc=2,
    )
    assert "2 rank(s)" in proc.stdout and "rankings of 2-2 candidates" in proc.stdout
    records = _check(proc, tmp_path / "run")
    assert records[0]["data/reward_gap_mean"] == 1.0
    from transformers import AutoModelForCausalLM

    run, _ = read_run(tmp_path / "run")
    AutoModelForCausalLM.from_pretrained(run / "policy")


def _scored(proc):
    """(candidates, rankings, candidates scored rather than read from the cache) of a --score-candidates run."""
    found = re.search(r"scored the (\d+) candidates of the (\d+) rankings read \((\d+) computed", proc.stdout)
    assert found, proc.stdout[-3000:]
    return tuple(int(n) for n in found.groups())


def test_scored_candidates_are_cached(builtin_path, tmp_path):
    """--score-candidates on the built-in preference rows: the candidates of the rankings a run reads are scored
    (not the file's), read back from the cache by a second run (the same numbers); a longer run scores only the
    rankings it adds and logs the numbers of the same run scored afresh; scored anew when the key changes (twice the
    reward weight: twice the rewards)."""
    rows = os.path.join(builtin_path, "data", "preference")
    cache = ["--cache-dir", str(tmp_path / "cache")]
    args = [*TINY, "--offline-dataset", rows, "--score-candidates"]
    first = run_script("pro.py", *args, *cache, "--output-dir", str(tmp_path / "first"), env={"OMP_NUM_THREADS": "1"})
    candidates, rankings, computed = _scored(first)
    assert computed == candidates == 2 * rankings and rankings <= 16  # 4 steps × 4 rankings of 2
    longer = [*args, "--total-steps", "8", "--eval-every", "8"]
    jobs = {
        "again": ("pro.py", [*args, *cache, "--output-dir", str(tmp_path / "again")], {}),
        "longer": ("pro.py", [*longer, *cache, "--output-dir", str(tmp_path / "longer")], {}),
        "fresh": (
            "pro.py",
            [*longer, "--no-cache", "--cache-dir", str(tmp_path / "f"), "--output-dir", str(tmp_path / "fresh")],
            {},
        ),
        "doubled": ("pro.py", [*args, *cache, "--reward-weights", "2", "--output-dir", str(tmp_path / "doubled")], {}),
    }
    runs = run_pairs(jobs)
    assert _scored(runs["again"]) == (candidates, rankings, 0)
    longer_candidates, _, longer_computed = _scored(runs["longer"])
    assert longer_computed == longer_candidates - candidates > 0  # the first run's rankings are read back
    assert _scored(runs["fresh"])[2] == longer_candidates
    assert _scored(runs["doubled"])[2] == candidates
    records = {
        name: _check(proc, tmp_path / name, steps=8 if name in ("longer", "fresh") else 4)
        for name, proc in [("first", first), *runs.items()]
    }
    assert without_timings(records["again"]) == without_timings(records["first"])  # wall-clock seconds aside
    for mixed, whole in zip(records["longer"], records["fresh"]):
        for name, value in whole.items():
            if not name.startswith("time/"):  # the same numbers (to the last bits: batches padded otherwise)
                assert mixed[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    assert records["first"][0]["data/reward_gap_mean"] > 0  # the reward model re-ranks: best above worst
    doubled = records["doubled"][0]["data/reward_mean"]
    assert doubled == pytest.approx(2 * records["first"][0]["data/reward_mean"], rel=1e-5)


def test_bad_rankings_fail_with_one_line(builtin_path, tmp_path):
    def rows(name, records):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
        return str(path)

    good = {"prompt": "the movie", "responses": ["was fine", "was bad"], "rewards": [1.0, 0.0]}
    datasets = {
        "lengths": rows("lengths", [good, {"prompt": "a film", "responses": ["ok", "bad", "meh"], "rewards": [1, 0]}]),
        "single": rows("single", [good, {"prompt": "a film", "responses": ["ok"], "rewards": [1.0]}]),
        "ties": rows("ties", [{"prompt": "a film", "responses": ["ok", "bad"], "rewards": [0.5, 0.5]}] * 8),
    }
    jobs = {
        name: ("pro.py", [*TINY, "--offline-dataset", path, "--output-dir", str(tmp_path / name)], {})
        for name, path in datasets.items()
    }
    jobs["ranking_len"] = (
        "pro.py",
        [*TINY, "--ranking-len", "1", "--output-dir", str(tmp_path / "r")],
        {},
    )
    jobs["preset"] = ("pro.py", ["--preset", "hh-2b", "--output-dir", str(tmp_path / "p")], {})
    procs = run_pairs(jobs)
    assert "row 1 has 3 candidates and 2 rewards" in error_line(procs["lengths"])
    assert "row 1 has 1 candidate; a ranking needs at least 2" in error_line(procs["single"])
    assert "every ranking" in error_line(procs["ties"]) and "ties" in error_line(procs["ties"])
    assert "--ranking-len 1" in error_line(procs["ranking_len"])
    assert "hh-125m, hh-1b, hh-6b" in error_line(procs["preset"])


# Learning test: on the built-in rankings, PRO raises the held-out gold score over the SFT policy's (measured with the
# defaults on 2 CPU cores: -0.055 → +0.21 after 30 steps, +0.19 to +0.22 after 10 at lr 1e-5 to 3e-5).
def test_learning_raises_the_gold_score(builtin_path, tmp_path):
    proc = run_script("pro.py", "--total-steps", "10", "--eval-every", "10", "--output-dir", str(tmp_path))
    _, records = read_run(tmp_path)
    before = records[0]["eval/gold_score"]
    after = records[-1]["eval/gold_score"]
    assert after > before + 0.1, (before, after, proc.stdout[-2000:])
