"""ilql.py end to end on the built-in scored responses (subprocesses, tiny settings): training, the β sweep, the
checkpoint (an HF folder plus the heads) reloaded for decoding, two ranks under ZeRO-2, and bad input."""

import math

import pytest
from conftest import assert_resume_reproduces, read_run, run_script, timed
from safetensors.torch import load_file

TINY = (
    "--offline-epochs 1 --mini-batch-size 64 --eval-prompts 16 --max-new-tokens 16 --log-every 4 --eval-betas 0 2"
).split()


def _check_run(records):
    evals = [r for r in records if "eval/beta_0/gold_score" in r]
    assert len(evals) == 2, records  # before and after training
    assert {"eval/beta_2/gold_score", "eval/beta_2/reward", "eval/beta_0/response_length"} <= set(evals[-1])
    assert "data/gold_score" in records[0]
    steps = [r for r in records if "q/loss" in r]
    assert steps and {"value/loss", "q/cql_loss", "policy/awac_loss", "q/mean", "value/mean", "q/target_mean"} <= set(
        steps[-1]
    )
    assert all(math.isfinite(v) for r in records for v in r.values())
    assert timed(records, "update") == steps  # the seconds of each logged step, and of the evaluation after training
    assert timed(records, "eval") == evals[1:]


@pytest.fixture(scope="module")
def trained(builtin_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("ilql")
    proc = run_script("ilql.py", *TINY, "--output-dir", str(out))
    return out, proc


def test_single_process_run_logs_every_term_and_the_sweep(trained):
    out, proc = trained
    assert "done in" in proc.stdout and "β=2" in proc.stdout
    _, records = read_run(out)
    _check_run(records)
    assert records[-1]["step"] == 1024 // 64


def test_stopped_mid_epoch_and_resumed_is_identical(trained, tmp_path):
    """Stopped at step 1 of 16 (mid-epoch: the shuffled order and the target heads must come back too)."""
    _, records = read_run(trained[0])
    assert_resume_reproduces("ilql.py", TINY, records, tmp_path)


def test_checkpoint_is_an_hf_folder_plus_heads_and_decodes_with_eval_only(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    out, _ = trained
    run_dir, records = read_run(out)
    policy = run_dir / "policy"
    AutoModelForCausalLM.from_pretrained(policy)  # the LM alone loads as a plain HF model
    heads = load_file(policy / "ilql_heads.safetensors")
    assert any(k.startswith("v_head.") for k in heads) and any(k.startswith("q_heads.1.") for k in heads)
    assert any(k.startswith("target_q_heads.1.") for k in heads)
    assert not any(k.startswith("lm.") for k in heads)
    # decoding the checkpoint again reproduces the run's final evaluation (same prompts, same seed, same heads)
    proc = run_script("ilql.py", "--eval-only", "--checkpoint", str(policy), *TINY, "--output-dir", str(tmp_path))
    _, reloaded = read_run(tmp_path)
    final = [r for r in records if "eval/beta_2/gold_score" in r][-1]
    for key in ("eval/beta_0/gold_score", "eval/beta_2/gold_score", "eval/beta_2/reward"):
        assert reloaded[0][key] == pytest.approx(final[key], abs=1e-4), key
    assert "β=2" in proc.stdout


def test_torchrun_two_ranks_zero2(builtin_path, tmp_path):
    run_script("ilql.py", *TINY, "--zero-stage", "2", "--output-dir", str(tmp_path / "a"), nproc=2)
    run_dir, records = read_run(tmp_path / "a")
    _check_run(records)
    assert_resume_reproduces("ilql.py", [*TINY, "--zero-stage", "2"], records, tmp_path, nproc=2)
    assert records[-1]["step"] == 1024 // 2 // 64  # each rank holds half the rows
    assert (run_dir / "policy" / "ilql_heads.safetensors").exists()


def test_bad_inputs_give_one_line(builtin_path, tmp_path):
    proc = run_script("ilql.py", "--eval-only", "--output-dir", str(tmp_path), check=False)
    assert proc.returncode != 0 and "error: --eval-only needs --checkpoint" in proc.stderr.strip().splitlines()[-1]
    proc = run_script("ilql.py", "--checkpoint", str(builtin_path) + "/sft", "--output-dir", str(tmp_path), check=False)
    assert proc.returncode != 0 and "ilql_heads.safetensors is missing" in proc.stderr.strip().splitlines()[-1]
    proc = run_script("ilql.py", "--mini-batch-size", "4096", "--output-dir", str(tmp_path), check=False)
    assert proc.returncode != 0 and "lower --mini-batch-size" in proc.stderr.strip().splitlines()[-1]
    proc = run_script("ilql.py", "--preset", "hh-2b", "--output-dir", str(tmp_path), check=False)
    assert proc.returncode != 0 and "hh-125m, hh-1b, hh-6b" in proc.stderr.strip().splitlines()[-1]
