"""apa.py and awr.py end to end on the built-in task (subprocesses, tiny settings), online and offline."""

import math

import pytest
from conftest import TINY_ONLINE, assert_resume_reproduces, read_run, run_script, timed

# With the first 256 of the built-in task's scored rows (builtin_offline_head): 8 steps an epoch
OFFLINE = "--offline-epochs 2 --mini-batch-size 32 --max-new-tokens 24 --eval-prompts 16".split()


def _check(records, steps, keys):
    assert [r["step"] for r in records] == list(range(steps + 1))
    assert (
        timed(records, "update", "eval", "iteration") == records[1:]
    )  # the phases' seconds at every iteration (each evaluates)
    for key in keys:
        assert key in records[-1], key
    assert all(math.isfinite(v) for r in records for v in r.values())


@pytest.mark.parametrize("script", ["apa.py", "awr.py"])
def test_online_single_process(builtin_path, tmp_path, script):
    proc = run_script(script, *TINY_ONLINE, "--output-dir", str(tmp_path / "a"))
    assert "done in" in proc.stdout
    _, records = read_run(tmp_path / "a")
    _check(
        records,
        2,
        [
            "policy/loss",
            "value/loss",
            "rollout/score",
            "rollout/gold_score",
            "rollout/kl_to_ref",
            "eval/gold_score",
            "eval/kl_to_ref",
        ],
    )
    if script == "apa.py":  # stopped by SIGTERM at iteration 1 of 2, resumed: the same numbers
        assert_resume_reproduces(script, TINY_ONLINE, records, tmp_path)


@pytest.mark.parametrize("script", ["apa.py", "awr.py"])
def test_offline_advantages_are_refreshed_every_epoch(builtin_offline_head, tmp_path, script):
    """The value model is fitted to the returns first and the advantages recomputed from it before every epoch
    (the released offline code took them once from an untrained value head): they must change between epochs."""
    args = ["--offline-dataset", builtin_offline_head, *OFFLINE]
    run_script(script, *args, "--output-dir", str(tmp_path / "a"))
    _, records = read_run(tmp_path / "a")
    _check(records, 2, ["policy/loss", "value/loss", "offline/advantage_change", "eval/gold_score"])
    assert records[1]["offline/advantage_change"] == 0.0  # nothing to compare with at the first epoch
    assert records[2]["offline/advantage_change"] > 1e-3
    if script == "awr.py":  # stopped after epoch 1 of 2, resumed (its value model and last advantages): the same
        assert_resume_reproduces(script, args, records, tmp_path)


def test_apa_torchrun_zero3(builtin_path, tmp_path):
    args = [*TINY_ONLINE, "--total-episodes", "64", "--zero-stage", "3"]
    proc = run_script("apa.py", *args, "--output-dir", str(tmp_path / "a"), nproc=2)
    assert "2 rank(s)" in proc.stdout
    run, records = read_run(tmp_path / "a")
    _check(records, 2, ["policy/loss", "eval/kl_to_ref"])
    assert_resume_reproduces("apa.py", args, records, tmp_path, nproc=2)  # ZeRO-3 shards saved and restored
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "policy")


def test_offline_dataset_with_wrong_columns_names_the_shapes(builtin_path, tmp_path):
    import json

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": "the movie", "text": "was fine"}) + "\n" for _ in range(4)))
    proc = run_script("apa.py", "--offline-dataset", str(data), check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "offline rows need prompt, response, reward (or prompt, chosen, rejected" in proc.stderr


def test_unfrozen_layers_and_adam_settings(builtin_path, tmp_path):
    """--unfrozen-layers 1 (the released runs train the top 2 blocks): the saved policy's embeddings and lower block
    are bit-identical to the SFT model's, the top block moved; AdamW betas / weight decay are accepted."""
    from safetensors.torch import load_file

    run_script(
        "apa.py",
        *TINY_ONLINE,
        "--unfrozen-layers",
        "1",
        "--adam-betas",
        "0.9",
        "0.999",
        "--weight-decay",
        "1e-6",
        "--learning-rate",
        "1e-3",
        "--output-dir",
        str(tmp_path),
    )
    run, _ = read_run(tmp_path)
    before = load_file(f"{builtin_path}/sft/model.safetensors")
    after = load_file(run / "policy" / "model.safetensors")
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.mlp.c_fc.weight"):
        assert (before[name] == after[name]).all(), name
    assert not (before["transformer.h.1.mlp.c_fc.weight"] == after["transformer.h.1.mlp.c_fc.weight"]).all()
    assert not (before["transformer.ln_f.weight"] == after["transformer.ln_f.weight"]).all()


def test_stop_strings_cut_rollouts(builtin_path, tmp_path):
    """--stop-strings "." cuts every built-in response at the end of its first sentence: short, and all ended."""
    run_script("apa.py", *TINY_ONLINE, "--stop-strings", ".", "--output-dir", str(tmp_path))
    _, records = read_run(tmp_path)
    for r in records[1:]:
        assert r["rollout/no_eos_fraction"] == 0 and r["rollout/response_length"] < 8, r
