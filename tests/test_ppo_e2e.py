"""ppo.py end to end on the built-in task: subprocesses with tiny settings, as a user would launch it."""

import json
import math
import os
import sys

import pytest
from conftest import (
    ROOT,
    TINY_ONLINE,
    assert_resume_reproduces,
    error_line,
    free_port,
    read_run,
    run_script,
    timed,
    without_timings,
)


def _check_metrics(records, iterations):
    assert [r["step"] for r in records] == list(range(iterations + 1))
    for key in (
        "policy/loss",
        "value/loss",
        "rollout/score",
        "rollout/gold_score",
        "rollout/kl_to_ref",
        "rollout/perplexity",
        "policy/approx_kl",
        "eval/gold_score",
        "eval/kl_to_ref",
    ):
        assert key in records[-1], key
    assert all(math.isfinite(v) for r in records for v in r.values())
    assert timed(records, "rollout", "update", "iteration") == records[1:]  # the phases' seconds at every iteration


def test_help_lists_every_argument_with_its_docstring():
    import ppo

    out = run_script("ppo.py", "--help").stdout
    for field in ppo.Args.__dataclass_fields__:
        assert f"--{field.replace('_', '-')}" in out, field
    assert "the SFT policy, which is also the frozen reference" in out
    assert "responses sampled per rank per iteration" in out


def test_single_process_stopped_and_resumed_is_identical_and_checkpoint_reloads(builtin_path, tmp_path):
    """Also determinism: the stopped run's first records, carried into the resumed run, must equal run a's. With a
    learning-rate warm-up and decay, whose position the checkpoint must keep."""
    args = [*TINY_ONLINE, "--lr-warmup-steps", "2", "--lr-schedule", "linear"]
    proc = run_script("ppo.py", *args, "--output-dir", str(tmp_path / "a"))
    assert "done in" in proc.stdout and "tokens/s" in proc.stdout
    run_a, records_a = read_run(tmp_path / "a")
    _check_metrics(records_a, 2)
    # 2 mini-batches an iteration, 4 steps in all: after warm-up the rate falls linearly to 0 at step 4
    import common

    factor = common.lr_schedule(2, 4, "linear")
    assert [r["policy/learning_rate"] for r in records_a[1:]] == pytest.approx([3e-5 * factor(2), 3e-5 * factor(4)])
    assert records_a[1]["policy/learning_rate"] == pytest.approx(3e-5) and records_a[2]["policy/learning_rate"] == 0
    assert_resume_reproduces("ppo.py", args, records_a, tmp_path)

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    policy = AutoModelForCausalLM.from_pretrained(run_a / "policy")
    tokenizer = AutoTokenizer.from_pretrained(run_a / "policy")
    sft = AutoModelForCausalLM.from_pretrained(os.path.join(builtin_path, "sft"))
    assert any(not torch.equal(p, q) for p, q in zip(policy.parameters(), sft.parameters())), "policy never moved"
    enc = tokenizer(["the movie was"], return_tensors="pt")
    out = policy.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > enc.input_ids.shape[1]
    AutoModelForSequenceClassification.from_pretrained(run_a / "value")


@pytest.mark.parametrize("zero_stage", ["2", "3"])
def test_torchrun_two_ranks(builtin_path, tmp_path, zero_stage):
    args = [*TINY_ONLINE, "--total-episodes", "64", "--zero-stage", zero_stage]
    proc = run_script("ppo.py", *args, "--output-dir", str(tmp_path / "a"), nproc=2)
    assert "2 rank(s)" in proc.stdout
    run, records = read_run(tmp_path / "a")
    _check_metrics(records, 2)
    if zero_stage == "2":  # killed (SIGTERM to torchrun, which forwards it) and resumed: the same numbers
        assert_resume_reproduces("ppo.py", args, records, tmp_path, nproc=2)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run / "policy")  # ZeRO-3 shards were gathered on save
    assert model.transformer.wte.weight.shape[0] > 100


def test_torchrun_value_model_on_cpu_trains_as_the_default_placement(builtin_path, tmp_path):
    """Two ranks: the value model as a plain AdamW engine on the CPU (gradients averaged over the ranks by hand)
    logs the numbers of the default placement, a DeepSpeed engine on each rank's device."""
    args = [*TINY_ONLINE, "--total-episodes", "64"]
    run_script("ppo.py", *args, "--output-dir", str(tmp_path / "default"), nproc=2)
    run_script("ppo.py", *args, "--value-device", "cpu", "--output-dir", str(tmp_path / "cpu"), nproc=2)
    default = without_timings(read_run(tmp_path / "default")[1])
    on_cpu = without_timings(read_run(tmp_path / "cpu")[1])
    assert [r.keys() for r in on_cpu] == [r.keys() for r in default]
    for a, b in zip(default, on_cpu):
        assert b == {k: pytest.approx(v, rel=1e-5, abs=1e-6) for k, v in a.items()}


def test_frozen_models_and_value_model_on_cpu_with_the_ppo_max_preset(builtin_path, tmp_path):
    """`--preset ppo-max`: PPO-max's released values, except the flags given (they win); the value model on the CPU
    as a plain AdamW engine with the recipe's warm-up, stopped and resumed exactly."""
    args = [
        *TINY_ONLINE,
        "--ref-device",
        "cpu",
        "--reward-device",
        "cpu",
        "--value-device",
        "cpu",
        "--preset",
        "ppo-max",
        "--entropy-coef",
        "0.01",
        "--ptx-coef",
        "0.5",
        "--missing-eos-penalty",
        "-1",
        "--init-kl-coef",
        "0.02",
        "--learning-rate",
        "1e-4",
        "--whiten-advantages",
    ]
    run_script("ppo.py", *args, "--output-dir", str(tmp_path / "a"))
    run, records = read_run(tmp_path / "a")
    _check_metrics(records, 2)
    used = json.loads((run / "args.json").read_text())
    import ppo

    given = {"init_kl_coef": 0.02, "learning_rate": 1e-4, "whiten_advantages": True}
    assert used["preset"] == "ppo-max"
    for name, value in ppo.PRESETS["ppo-max"].items():
        assert used[name] == given.get(name, value), name
    assert used["repetition_penalty"] == 1.1 and used["top_p"] == 0.9 and used["lr_schedule"] == "inverse_sqrt"
    assert records[1]["rollout/kl_coef"] == pytest.approx(0.02) == records[2]["rollout/kl_coef"]  # fixed, as given
    assert records[-1]["policy/ptx_loss"] > 0
    assert records[-1]["policy/learning_rate"] == pytest.approx(1e-4 * 5 / 100)  # warm-up: step 4 of 100
    assert_resume_reproduces("ppo.py", args, records, tmp_path)


# ---------------------------------------------------------------------------------------------- bad inputs
def test_missing_model_path_names_the_fix(tmp_path):
    line = error_line(run_script("ppo.py", "--model-name-or-path", str(tmp_path / "no-such-model"), check=False))
    assert "no-such-model" in line and "--model-name-or-path" in line


def test_dataset_without_prompt_column_lists_its_columns(builtin_path, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"question": f"the movie {i}", "id": i}) + "\n" for i in range(4)))
    line = error_line(run_script("ppo.py", "--dataset", str(data), check=False))
    assert "'prompt'" in line and "question, id" in line and "--prompt-field" in line


def test_long_prompts_are_left_truncated_and_counted_or_rejected(builtin_path, tmp_path):
    data = tmp_path / "long.jsonl"
    rows = [{"prompt": "the movie was " + "really " * 80 + "great"}, {"prompt": "the plot was"}] * 8
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_script(
        "ppo.py",
        *TINY_ONLINE,
        "--total-episodes",
        "16",
        "--dataset",
        str(data),
        "--train-split",
        "train",
        "--eval-split",
        "train",
        "--output-dir",
        str(tmp_path / "runs"),
    )
    assert "8 training prompts were left-truncated" in proc.stdout
    line = error_line(run_script("ppo.py", "--max-new-tokens", "64", check=False))  # built-in context is 64
    assert "--max-new-tokens" in line and "context of 64" in line


def test_zero3_without_deepspeed_says_how_to_install(tmp_path):
    blocker = tmp_path / "blocker"
    (blocker / "deepspeed").mkdir(parents=True)
    (blocker / "deepspeed" / "__init__.py").write_text("raise ImportError('DeepSpeed hidden by the test')\n")
    env = {"PYTHONPATH": str(blocker)}
    line = error_line(run_script("ppo.py", "--zero-stage", "3", env=env, check=False))
    assert "DeepSpeed" in line and "pip install" in line and "--zero-stage 0" in line


def test_reward_model_with_its_own_tokenizer_is_fed_re_encoded_text(builtin_path, tmp_path):
    """A reward model with GPT-2's BPE vocabulary (from ../shared/data) scores decoded, re-encoded responses; the value
    model then starts from the policy, whose vocabulary it must read."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    gpt2_dir = ROOT.parent / "shared" / "data" / "tokenizers" / "gpt2"
    assert (gpt2_dir / "tokenizer.json").exists(), f"missing {gpt2_dir}: CI needs ../shared beside the project"
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    torch.manual_seed(0)
    reward_model = GPT2ForSequenceClassification(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=128,
            n_embd=16,
            n_layer=1,
            n_head=2,
            num_labels=1,
            pad_token_id=tokenizer.eos_token_id,
        )
    )
    reward_model.save_pretrained(tmp_path / "reward_model")
    tokenizer.save_pretrained(tmp_path / "reward_model")
    proc = run_script(
        "ppo.py", *TINY_ONLINE, "--reward-model", str(tmp_path / "reward_model"), "--output-dir", str(tmp_path / "r")
    )
    assert "value model is initialised from the policy" in proc.stdout
    run, records = read_run(tmp_path / "r")
    assert records[1]["rollout/score_std"] > 0  # a random RM still gives different texts different scores
    assert json.loads((run / "args.json").read_text())["value_model"] == "policy"  # args.json tells what ran


def test_deepspeed_launcher_passes_local_rank(builtin_path, tmp_path):
    """`deepspeed --num_gpus 2 ppo.py` (it adds --local_rank=N to the arguments) runs two CPU processes."""
    import subprocess

    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [
        launcher,
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "ppo.py",
        *TINY_ONLINE,
        "--zero-stage",
        "0",
        "--output-dir",
        str(tmp_path / "run"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "--local_rank=1" in proc.stdout + proc.stderr and "2 rank(s)" in proc.stdout
    _check_metrics(read_run(tmp_path / "run")[1], 1)  # 32 episodes: one iteration of 16 on each of 2 ranks
