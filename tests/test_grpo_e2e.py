"""grpo.py end to end on the built-in task: subprocesses with tiny settings, as a user would launch it."""

import math

from conftest import TINY_ONLINE, assert_resume_reproduces, error_line, read_run, run_pairs, run_script, timed

# TINY_ONLINE: 16 responses an iteration = 4 prompts × the default group of 4, mini-batches of 8, 2 iterations


def _check_metrics(records, iterations, with_ref=True):
    assert [r["step"] for r in records] == list(range(iterations + 1))
    kl_keys = ("rollout/kl_to_ref", "rollout/kl_k1", "rollout/kl_k3", "eval/kl_to_ref")
    assert all((key in records[-1]) == with_ref for key in kl_keys)  # no π_ref, no KL to it logged
    for key in (
        "policy/loss",
        "policy/policy_loss",
        "policy/clipfrac_low",
        "policy/clipfrac_high",
        "policy/approx_kl",
        "rollout/score",
        "rollout/gold_score",
        "rollout/score_std_in_group",
        "rollout/zero_std_groups",
        "eval/gold_score",
    ):
        assert key in records[-1], key
    assert "value/loss" not in records[-1]  # no value model
    assert all(math.isfinite(v) for r in records for v in r.values())
    assert timed(records, "rollout", "update", "iteration") == records[1:]
    assert all(0 <= r["rollout/zero_std_groups"] <= 1 for r in records[1:])


def test_default_run_and_stopped_and_resumed_is_identical(builtin_path, tmp_path):
    """The default variant (GRPO's advantages, sequence_mean, token ratios, β · k3 in the loss), then a run stopped by
    SIGTERM and resumed, which must log exactly the same numbers."""
    proc = run_script("grpo.py", *TINY_ONLINE, "--output-dir", str(tmp_path / "a"))
    assert "2 iterations × 4 prompts × 4 responses × 1 rank(s)" in proc.stdout
    assert "done in" in proc.stdout
    run_a, records_a = read_run(tmp_path / "a")
    _check_metrics(records_a, 2)
    assert records_a[2]["policy/kl_loss"] > 0  # k3 ≥ 0, and > 0 once the policy has moved from π_ref
    assert (run_a / "policy" / "config.json").exists()
    assert not (run_a / "value").exists()
    assert_resume_reproduces("grpo.py", TINY_ONLINE, records_a, tmp_path)


# A 0/1 reward as a verifier gives one: prompts of an odd number of characters never score (their groups carry no
# signal, and dynamic sampling drops them), the others score the responses of an even number of words.
BINARY_REWARD = """
def even_even(prompts, responses):
    return [float(len(p) % 2 == 0 and len(r.split()) % 2 == 0) for p, r in zip(prompts, responses)]
"""


def test_every_variant_flag_runs(builtin_path, tmp_path):
    """Each flag at least once, in four runs: Dr. GRPO without π_ref, with DAPO's overlong shaping; RLOO with the KL
    in the reward, DAPO's token-mean and clip-higher over two epochs; GSPO's sequence ratio with LoRA (π_ref = the
    adapter off); the DAPO preset (dynamic sampling) with a 0/1 reward."""
    (tmp_path / "binary_reward.py").write_text(BINARY_REWARD)
    jobs = {
        "dr_grpo": [
            *("--advantage-estimator", "dr_grpo", "--loss-aggregation", "constant", "--kl-coef", "0"),
            *("--overlong-buffer", "6"),
        ],
        "rloo": [
            "--preset",
            "rloo",
            "--loss-aggregation",
            "token_mean",
            "--cliprange-high",
            "0.28",
            "--update-epochs",
            "2",
        ],
        "gspo": ["--importance", "sequence", "--group-size", "2", "--lora-r", "4", "--learning-rate", "1e-3"],
        "dapo": [
            *("--preset", "dapo", "--group-size", "4", "--max-sampling-rounds", "3"),
            *("--reward-model", "binary_reward:even_even"),
        ],
    }
    env = {"PYTHONPATH": str(tmp_path)}
    runs = {
        name: ("grpo.py", [*TINY_ONLINE, *flags, "--output-dir", str(tmp_path / name)], {"env": env})
        for name, flags in jobs.items()
    }
    procs = run_pairs(runs)
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    records = {name: read_run(tmp_path / name)[1] for name in jobs}
    for name in jobs:
        _check_metrics(records[name], 2, with_ref=name not in ("dr_grpo", "dapo"))

    # β = 0: π_ref is not loaded, said once; no KL term in the loss, and no KL to π_ref logged or printed
    assert "π_ref is not loaded" in procs["dr_grpo"].stdout
    assert all("policy/kl_loss" not in r for r in records["dr_grpo"][1:])
    assert " kl " not in procs["dr_grpo"].stdout.split("iter    1/")[1]
    # --overlong-buffer 6 of 12 new tokens: the responses that reach 7 or more tokens lose up to 1
    assert all(-1 <= r["rollout/overlong_penalty"] < 0 for r in records["dr_grpo"][1:])

    # RLOO: the KL is in the reward, not the loss; after the first iteration's two epochs π_old has left π_ref
    assert all("policy/kl_loss" not in r for r in records["rloo"][1:])
    assert records["rloo"][2]["rollout/kl_to_ref"] != 0

    # GSPO with groups of 2 (8 prompts an iteration) and LoRA: the KL in the loss, π_ref the adapter switched off
    assert "2 iterations × 8 prompts × 2 responses" in procs["gspo"].stdout
    assert records["gspo"][2]["policy/kl_loss"] > 0  # (LoRA's B starts at 0: a higher rate moves it in two steps)

    # DAPO's dynamic sampling: the odd-length prompts drawn (the draws do not depend on the machine) are dropped, and
    # the batch trained on holds only groups with a signal unless the 3 rounds ran out and dropped ones filled it
    dapo = records["dapo"][1:]
    assert sum(r["rollout/dropped_groups"] for r in dapo) > 0
    for r in dapo:
        assert 1 <= r["rollout/sampling_rounds"] <= 3
        assert r["rollout/zero_std_groups"] == r["rollout/filled_groups"] / 4  # of the 4 groups trained on
        assert r["rollout/filled_groups"] == 0 or r["rollout/sampling_rounds"] == 3
    assert all("rollout/sampling_rounds" not in r for name in ("dr_grpo", "rloo", "gspo") for r in records[name])


def test_two_ranks_under_zero3_with_dynamic_sampling_and_micro_batches(builtin_path, tmp_path):
    """Two CPU ranks under ZeRO-3 (torchrun): the sampling rounds are collective (every rank runs as many, or the
    sharded generation would hang), each mini-batch's gradient accumulates over micro-batches of 2, and the saved
    policy loads as a whole model."""
    (tmp_path / "binary_reward.py").write_text(BINARY_REWARD)
    args = [
        *TINY_ONLINE,
        *("--zero-stage", "3", "--micro-batch-size", "2"),
        *("--dynamic-sampling", "--max-sampling-rounds", "3", "--reward-model", "binary_reward:even_even"),
    ]
    env = {"PYTHONPATH": str(tmp_path)}
    proc = run_script("grpo.py", *args, "--output-dir", str(tmp_path / "a"), nproc=2, env=env)
    assert "2 rank(s)" in proc.stdout
    run, records = read_run(tmp_path / "a")
    _check_metrics(records, 1)  # 32 responses: one iteration of 16 on each rank
    assert 1 <= records[1]["rollout/sampling_rounds"] <= 3
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "policy")


def test_bad_group_settings_are_one_line_errors(builtin_path):
    line = error_line(run_script("grpo.py", *TINY_ONLINE, "--group-size", "3", check=False))
    assert "--rollout-batch-size 16 is not a multiple of --group-size 3" in line and "--rollout-batch-size 15" in line
    line = error_line(run_script("grpo.py", *TINY_ONLINE, "--group-size", "1", check=False))
    assert "--group-size 1" in line and "--group-size 2 or more" in line
    line = error_line(run_script("grpo.py", *TINY_ONLINE, "--overlong-buffer", "12", check=False))
    assert "--overlong-buffer 12 must lie in [0, --max-new-tokens 12)" in line
