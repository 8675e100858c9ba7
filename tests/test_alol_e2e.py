"""alol.py end to end on the built-in task (subprocesses, tiny settings): each of the eight variants, two processes
under torchrun, the V_ref / advantage cache and its key, a bad dataset."""

import json
import math
import os
import re

import pytest
from conftest import assert_resume_reproduces, read_run, run_pairs, run_script, timed

ALGORITHMS = ["nll", "wbc", "r_gold", "r_lol", "a_lol", "a_lol_ref_free", "a_lol_seq", "a_lol_kl"]
TINY = (
    "--total-steps 8 --mini-batch-size 4 --eval-every 4 --eval-prompts 8 --value-prompts 40 --value-epochs 2 "
    "--max-new-tokens 12"
).split()
EVAL_KEYS = ["eval/reward", "eval/gold_score", "eval/distinct_1", "eval/distinct_2", "eval/response_length"]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One V_ref / advantage cache for all the variants: its key leaves the algorithm out."""
    return tmp_path_factory.mktemp("alol_cache")


def _check(proc, output_dir, algorithm, total_steps=8):
    assert "done in" in proc.stdout, proc.stdout
    run, records = read_run(output_dir)
    first, last = records[0], records[-1]
    n_steps = last["step"]
    assert [r["step"] for r in records] == list(range(n_steps + 1))
    assert timed(records, "update", "iteration") == records[1:]  # seconds at every step, and of every evaluation:
    assert timed(records, "eval") == [r for r in records[1:] if "eval/reward" in r]
    for key in EVAL_KEYS + ["data/rows", "data/dropped_rows", "data/advantage_mean", "value/heldout_mse"]:
        assert key in first, key
    for key in EVAL_KEYS + ["policy/loss", "policy/log_ratio_to_ref", "policy/clipfrac"]:
        assert key in last, key
    assert all(math.isfinite(v) for r in records for v in r.values())
    assert 0 < last["eval/distinct_1"] <= 1 and 0 < last["eval/distinct_2"] <= 1
    assert (run / "policy" / "config.json").exists() and (run / "policy" / "model.safetensors").exists()
    rows, dropped = first["data/rows"], first["data/dropped_rows"]
    assert f"{int(dropped)} dropped (weight ≤ 0)" in proc.stdout
    # nll: uniform, every row and every step; wbc, r_gold, r_lol: ∝ R = sigmoid(logit) > 0, no row dropped
    if algorithm in ("nll", "wbc", "r_gold", "r_lol"):
        assert dropped == 0 and n_steps == total_steps
    else:  # ∝ max(A, 0): rows with A ≤ 0 dropped, steps scaled by the positive fraction
        assert 0 < dropped < rows
        assert n_steps == max(1, round(total_steps * (rows - dropped) / rows))
    return first, last


@pytest.fixture(scope="module")
def variants(builtin_path, shared_cache, tmp_path_factory):
    """Each variant's run: a_lol first (it fits V_ref and fills the cache), then the other seven, two at a time."""
    out = tmp_path_factory.mktemp("variants")

    def job(algorithm):
        args = ["--algorithm", algorithm, *TINY, "--cache-dir", str(shared_cache), "--output-dir", str(out / algorithm)]
        return ("alol.py", args, {})

    runs = run_pairs({"a_lol": job("a_lol")}, workers=1)
    runs.update(run_pairs({a: job(a) for a in ALGORITHMS if a != "a_lol"}))
    return {a: (runs[a], out / a) for a in ALGORITHMS}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_each_variant(variants, shared_cache, tmp_path, algorithm):
    proc, out = variants[algorithm]
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert ("from the cache" in proc.stdout) == (algorithm != "a_lol")  # V_ref is fitted once, for all eight
    _check(proc, out, algorithm)
    assert len(list(shared_cache.glob("*.json"))) == 1  # the variants share one entry
    if algorithm == "nll":  # (uniform sampling: all 8 steps) stopped at step 1, resumed: the same numbers
        args = ["--algorithm", algorithm, *TINY, "--cache-dir", str(shared_cache)]
        assert_resume_reproduces("alol.py", args, read_run(out)[1], tmp_path, env={"OMP_NUM_THREADS": "1"})


def _ref_rows(proc):
    """(rows drawn, rows whose π_ref log-probs were computed rather than read from the cache), from the start line."""
    drawn, computed = re.search(r"π_ref's log-probs of the (\d+) rows drawn: (\d+) computed", proc.stdout).groups()
    return int(drawn), int(computed)


def test_pi_ref_log_probs_of_the_rows_drawn_only(variants, tmp_path):
    """π_ref's log-probs are computed for the rows a run draws only (not the file's), cached per row: a longer run
    computes only the rows it adds, and logs the numbers of the same run computed afresh (the a_lol variant)."""
    cache = tmp_path / "cache"
    short = run_script(
        "alol.py", *TINY, "--total-steps", "4", "--cache-dir", str(cache), "--output-dir", str(tmp_path / "short")
    )
    first, _ = _check(short, tmp_path / "short", "a_lol", total_steps=4)
    drawn, computed = _ref_rows(short)
    assert computed == drawn < first["data/rows"]
    (entry,) = (cache / "ref_logprobs").glob("*.json")
    assert len(json.loads(entry.read_text())["rows"]) == drawn
    longer = run_script("alol.py", *TINY, "--cache-dir", str(cache), "--output-dir", str(tmp_path / "longer"))
    _check(longer, tmp_path / "longer", "a_lol")
    drawn_longer, computed_longer = _ref_rows(longer)
    assert computed_longer < drawn_longer  # the short run's rows are read back
    assert len(json.loads(entry.read_text())["rows"]) == drawn + computed_longer
    fresh_proc, fresh_out = variants["a_lol"]
    assert _ref_rows(fresh_proc)[1] == drawn_longer
    for mixed, fresh in zip(read_run(tmp_path / "longer")[1], read_run(fresh_out)[1]):
        for name, value in fresh.items():
            if not name.startswith("time/"):  # the same numbers (to the last bits: π_ref's batches padded otherwise)
                assert mixed[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name


def test_no_cache_recomputes_and_overwrites(builtin_path, tmp_path, shared_cache):
    if not list(shared_cache.glob("*.json")):  # run alone: make the entry first
        run_script("alol.py", *TINY, "--cache-dir", str(shared_cache), "--output-dir", str(tmp_path / "first"))
    (entry,) = shared_cache.glob("*.json")
    before = json.loads(entry.read_text())
    os.utime(entry, (0, 0))
    proc = run_script(
        "alol.py",
        "--algorithm",
        "a_lol_seq",
        *TINY,
        "--no-cache",
        "--cache-dir",
        str(shared_cache),
        "--output-dir",
        str(tmp_path / "second"),
    )
    assert "V_ref fitted" in proc.stdout and "from the cache" not in proc.stdout
    (entry_after,) = shared_cache.glob("*.json")  # the same key: the entry is overwritten, not duplicated
    assert entry_after == entry and entry.stat().st_mtime > 0
    assert json.loads(entry.read_text()) == before  # recomputed under the same seed: the same V_ref fit


def test_torchrun_two_ranks_zero3_preference_rows(builtin_path, tmp_path):
    """Two ranks under ZeRO-3 (π_ref sharded too) compute V_ref and the advantages in lockstep, on preference rows
    whose chosen responses have no reward column: the reward model scores them."""
    proc = run_script(
        "alol.py",
        "--algorithm",
        "a_lol",
        *TINY,
        "--zero-stage",
        "3",
        "--offline-dataset",
        os.path.join(builtin_path, "data", "preference"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--output-dir",
        str(tmp_path / "run"),
        nproc=2,
    )
    assert "2 rank(s)" in proc.stdout and "V_ref fitted" in proc.stdout
    assert "no column reward" in proc.stdout
    first, _ = _check(proc, tmp_path / "run", "a_lol")
    import datasets

    preference = datasets.load_from_disk(os.path.join(builtin_path, "data", "preference"))
    assert first["data/rows"] == len(preference)  # every chosen response of the built-in preference rows
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    from transformers import AutoModelForCausalLM

    run, _ = read_run(tmp_path / "run")
    AutoModelForCausalLM.from_pretrained(run / "policy")


def test_dataset_without_response_column_names_the_shapes(builtin_path, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": "the movie", "text": "was fine", "reward": 1.0}) + "\n" for _ in range(4))
    )
    proc = run_script(
        "alol.py",
        "--offline-dataset",
        str(data),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--output-dir",
        str(tmp_path),
        check=False,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "A-LoL rows need prompt and response" in errors[0], proc.stderr[-2000:]


def test_cache_key_covers_stop_strings_and_reward_dtype(builtin_path, tmp_path):
    """V_ref's targets are π_ref's greedy responses, cut at the stop strings, and the rewards come from the reward
    model in its dtype: either changed is a new cache entry, never a stale one reused."""
    cache = tmp_path / "cache"
    run_script("alol.py", *TINY, "--cache-dir", str(cache), "--output-dir", str(tmp_path / "base"))
    assert len(list(cache.glob("*.json"))) == 1
    jobs = {
        "stop": (
            "alol.py",
            [*TINY, "--stop-strings", "film", "--cache-dir", str(cache), "--output-dir", str(tmp_path / "stop")],
            {},
        ),
        "dtype": (
            "alol.py",
            [*TINY, "--reward-dtype", "bfloat16", "--cache-dir", str(cache), "--output-dir", str(tmp_path / "dtype")],
            {},
        ),
    }
    for name, proc in run_pairs(jobs).items():
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "V_ref fitted" in proc.stdout, name  # computed, not read from the base run's entry
    assert len(list(cache.glob("*.json"))) == 3
