"""dpo.py end to end on the built-in task (subprocesses, tiny settings): one process with π_ref's cache and resume,
reference-free and IPO, two processes under torchrun with ZeRO-3, bad input, and a learning test."""

import json
import math
import re

import pytest
import torch
from conftest import assert_resume_reproduces, error_line, read_run, run_pairs, run_script, timed

import common
import dpo

# Tiny settings; the default --max-new-tokens (32) keeps π_ref's cache entry the one the learning test reads
TINY = "--total-steps 6 --mini-batch-size 4 --eval-every 3 --eval-prompts 8 --heldout-pairs 8".split()
EVAL_KEYS = ["eval/reward", "eval/gold_score", "eval/distinct_1", "eval/distinct_2", "eval/response_length"]
LOG_2 = math.log(2)  # the DPO loss of any pair while π_θ = π_ref
PAIR_KEYS = ["eval/preference_accuracy", "eval/reward_margin"]
POLICY_KEYS = [
    "policy/loss",
    "policy/chosen_rewards",
    "policy/rejected_rewards",
    "policy/reward_margin",
    "policy/reward_accuracy",
]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One π_ref cache for the module's runs on the built-in pairs."""
    return tmp_path_factory.mktemp("dpo_cache")


def _check(proc, output_dir, steps=6, reference_free=False, first_loss=LOG_2):
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert "done in" in proc.stdout, proc.stdout
    run, records = read_run(output_dir)
    first = records[0]
    last = records[-1]
    assert [r["step"] for r in records] == list(range(steps + 1))
    assert timed(records, "update", "iteration") == records[1:]  # seconds at every step, and of every evaluation:
    assert timed(records, "eval") == [r for r in records[1:] if "eval/reward" in r]
    for key in [*EVAL_KEYS, *PAIR_KEYS, "data/pairs", "data/heldout_pairs"]:
        assert key in first, key
    assert first["data/heldout_pairs"] == 8
    for key in [*EVAL_KEYS, *PAIR_KEYS, *POLICY_KEYS]:
        assert key in last, key
    assert ("policy/log_ratio_to_ref" in last) != reference_free
    assert all(math.isfinite(v) for r in records for v in r.values())
    assert 0 <= last["policy/reward_accuracy"] <= 1 and 0 <= last["eval/preference_accuracy"] <= 1
    if not reference_free:  # π_θ = π_ref before training: margins 0, DPO loss log 2 (to rounding: other padding)
        assert first["eval/reward_margin"] == pytest.approx(0, abs=1e-5)
        assert records[1]["policy/loss"] == pytest.approx(first_loss, abs=1e-5)
    assert (run / "policy" / "config.json").exists() and (run / "policy" / "model.safetensors").exists()
    return records


def test_one_process_cache_and_resume(builtin_path, shared_cache, tmp_path):
    args = [*TINY, "--cache-dir", str(shared_cache)]
    proc = run_script("dpo.py", *args, "--output-dir", str(tmp_path / "run"), env={"OMP_NUM_THREADS": "1"})
    assert "π_ref's log-probs of" in proc.stdout
    records = _check(proc, tmp_path / "run")
    n_pairs = len(common.load_preference_pairs("builtin")[0])
    assert records[0]["data/pairs"] + 8 == n_pairs  # every built-in pair, 8 held out
    (entry,) = shared_cache.glob("*.json")
    assert len(json.loads(entry.read_text())["rows"]) >= _pairs_read(n_pairs, steps=6)
    # stopped at step 1 and resumed (π_ref from the cache): the same numbers
    assert_resume_reproduces("dpo.py", args, records, tmp_path, env={"OMP_NUM_THREADS": "1"})


def _pairs_read(n_pairs, steps, batch=4, heldout=8, seed=1):
    """The pairs a run of `steps` steps reads: its draws (the script's order, from the seed) and the held-out ones."""
    draws = dpo.pair_order(n_pairs - heldout, steps * batch, torch.Generator().manual_seed(seed))
    return len(draws.unique()) + heldout


def _computed(proc):
    """How many pairs' π_ref log-probs a run computed (not read from the cache), from its start line."""
    return int(re.search(r"π_ref's log-probs of \d+ of \d+ pairs: (\d+) computed", proc.stdout).group(1))


def test_pi_ref_scores_only_the_pairs_a_run_reads(builtin_path, tmp_path):
    """A 3-step run computes π_ref's log-probs of its own pairs only (not the file's); a 6-step run on the same cache
    computes only the pairs it adds, and logs the numbers of a 6-step run that computes all of its pairs afresh."""
    n_pairs = len(common.load_preference_pairs("builtin")[0])
    cache = ["--cache-dir", str(tmp_path / "cache")]
    env = {"OMP_NUM_THREADS": "1"}
    short = run_script("dpo.py", *TINY, "--total-steps", "3", *cache, "--output-dir", str(tmp_path / "3"), env=env)
    _check(short, tmp_path / "3", steps=3)
    assert _computed(short) == _pairs_read(n_pairs, steps=3) < n_pairs
    (entry,) = (tmp_path / "cache").glob("*.json")
    assert len(json.loads(entry.read_text())["rows"]) == _pairs_read(n_pairs, steps=3)
    longer = run_script("dpo.py", *TINY, *cache, "--output-dir", str(tmp_path / "6"), env=env)
    cached = _check(longer, tmp_path / "6")
    added = _pairs_read(n_pairs, steps=6) - _pairs_read(n_pairs, steps=3)
    assert 0 < _computed(longer) == added
    assert len(json.loads(entry.read_text())["rows"]) == _pairs_read(n_pairs, steps=6)
    fresh_cache = ["--cache-dir", str(tmp_path / "fresh"), "--no-cache"]
    whole_run = run_script("dpo.py", *TINY, *fresh_cache, "--output-dir", str(tmp_path / "f"), env=env)
    fresh = _check(whole_run, tmp_path / "f")
    assert _computed(whole_run) == _pairs_read(n_pairs, steps=6)
    for mixed, whole in zip(cached, fresh):  # the same numbers (to the last bits: π_ref's batches padded otherwise)
        for name, value in whole.items():
            if not name.startswith("time/"):
                assert mixed[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name


def test_reference_free_and_ipo(builtin_path, shared_cache, tmp_path):
    jobs = {
        "free": ("dpo.py", [*TINY, "--reference-free", "--cache-dir", str(tmp_path / "unused")], {}),
        "ipo": ("dpo.py", [*TINY, "--loss-type", "ipo", "--beta", "0.5", "--cache-dir", str(shared_cache)], {}),
    }
    for name in jobs:
        jobs[name][1].extend(["--output-dir", str(tmp_path / name)])
    runs = run_pairs(jobs)
    assert "no π_ref (reference-free)" in runs["free"].stdout
    _check(runs["free"], tmp_path / "free", reference_free=True)
    assert not (tmp_path / "unused").exists()  # no π_ref, nothing cached
    _check(runs["ipo"], tmp_path / "ipo", first_loss=1.0)  # IPO: (0 − 1/(2β))² at π_θ = π_ref


def test_torchrun_two_ranks_zero3(builtin_path, tmp_path):
    """Two ranks under ZeRO-3 (π_ref sharded too) compute π_ref's log-probs in lockstep and share the pairs."""
    proc = run_script(
        "dpo.py",
        *TINY,
        "--zero-stage",
        "3",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--output-dir",
        str(tmp_path / "run"),
        nproc=2,
    )
    assert "2 rank(s)" in proc.stdout and "π_ref's log-probs of" in proc.stdout
    _check(proc, tmp_path / "run")
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    from transformers import AutoModelForCausalLM

    run, _ = read_run(tmp_path / "run")
    AutoModelForCausalLM.from_pretrained(run / "policy")


def test_bad_input_fails_with_one_line(builtin_path, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": "the movie", "response": "was fine", "reward": 1.0}) + "\n"))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "the movie", "chosen": "was great", "rejected": "was dull"}) + "\n")
    out = ["--output-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]
    cases = {
        "not pairs": (["--offline-dataset", str(rows)], "preference pairs need prompt, chosen, rejected"),
        "held out all": (["--offline-dataset", str(pairs), "--heldout-pairs", "1"], "leaves none of the 1 pairs"),
        "smoothing": (["--label-smoothing", "0.5"], "--label-smoothing is a flip probability in [0, 0.5)"),
        "smoothing ipo": (["--loss-type", "ipo", "--label-smoothing", "0.1"], "applies to --loss-type sigmoid"),
        "beta": (["--beta", "0"], "--beta must be positive"),
        "preset": (["--preset", "hh-2b"], "not one of this script's presets"),
    }
    runs = run_pairs({name: ("dpo.py", [*args, *out], {}) for name, (args, _) in cases.items()})
    for name, (_, message) in cases.items():
        assert message in error_line(runs[name]), name


# Learning test: the default run (30 steps of 16 pairs, β 0.1, lr 1e-4) raises the held-out gold score of greedy
# responses over the SFT policy's (measured on a 2-core AMD EPYC: −0.055 → +0.199 on 128 prompts, −0.033 → +0.193 on
# the 64 here); evaluated only before and after.
def test_default_run_raises_the_gold_score(builtin_path, shared_cache, tmp_path):
    args = [
        "--eval-every",
        "30",
        "--eval-prompts",
        "64",
        "--cache-dir",
        str(shared_cache),
        "--output-dir",
        str(tmp_path),
    ]
    proc = run_script("dpo.py", *args)
    assert proc.returncode == 0
    _, records = read_run(tmp_path)
    first = records[0]
    last = records[-1]
    assert last["step"] == 30
    assert last["eval/gold_score"] > first["eval/gold_score"] + 0.1, (first, last)
    assert last["eval/preference_accuracy"] > 0.5  # the implicit reward ranks most held-out pairs right
