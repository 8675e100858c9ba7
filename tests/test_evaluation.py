"""Judged evaluation of a saved run (evaluate.evaluate_run, `./launch.sh eval`) and `./launch.sh compare --offline`:
the win rate and its bootstrap interval, the log-probs of the sampling distribution, the KL to π_init, ILQL's
decoding, bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, error_line, run_pairs
from transformers import GenerationConfig

import common
import evaluate

DPO_TINY = "--total-steps 4 --mini-batch-size 4 --eval-every 4 --eval-prompts 8 --heldout-pairs 8".split()
ILQL_TINY = "--offline-epochs 1 --mini-batch-size 64 --eval-prompts 8 --max-new-tokens 16 --eval-betas 0".split()


def launch(*args, timeout=900):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    return subprocess.run(
        ["bash", str(ROOT / "launch.sh"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_win_rate_counts_ties_as_half_and_brackets_the_rate():
    scores = [3.0, 1.0, 2.0, 5.0, 0.0]
    baseline = [1.0, 1.0, 4.0, 2.0, 0.0]  # win, tie, loss, win, tie
    rate, low, high = evaluate.win_rate(scores, baseline, resamples=2000, seed=0)
    assert rate == pytest.approx((1 + 0.5 + 0 + 1 + 0.5) / 5)
    assert 0 <= low < rate < high <= 1
    # Every prompt won: no resample can say otherwise
    assert evaluate.win_rate([2.0] * 8, [1.0] * 8) == (1.0, 1.0, 1.0)
    # More prompts, the same win fraction: a narrower interval
    _, low_many, high_many = evaluate.win_rate(scores * 40, baseline * 40, resamples=2000, seed=0)
    assert high_many - low_many < high - low


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_log_probs_are_those_of_the_sampling_distribution(builtin_path, temperature):
    """The log-probs read from generate's processed scores, step by step, equal a teacher-forced pass at the same
    temperature."""
    tokenizer = common.load_tokenizer("builtin")
    policy = evaluate.EvalPolicy(common.load_model("builtin", kind="causal", flag="--model-name-or-path"), None)
    prompts, _ = common.encode_prompts(
        tokenizer, common.load_prompts("builtin", "test")[:6], max_prompt_length=16, max_new_tokens=12, context=64
    )
    settings = GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_k=0,
        max_new_tokens=12,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        output_scores=True,
        return_dict_in_generate=True,
    )
    generate = policy.lm.generate
    asked = []

    def generate_keeping_no_scores(**kwargs):
        asked.append(kwargs["generation_config"].output_scores)
        return generate(**kwargs)

    policy.lm.generate = generate_keeping_no_scores
    torch.manual_seed(0)
    parts = evaluate.sample_for_eval(
        policy, tokenizer, prompts, settings=settings, stop_strings=[], batch_size=4, device="cpu"
    )
    assert asked == [False, False]  # one step's distribution at a time, not every step's scores kept to the end
    assert [len(p.texts) for p in parts] == [4, 2]  # ragged: the second batch is short, its responses of any length
    for part in parts:
        expected = common.forward_logprobs(policy.lm, *part.batch, temperature=temperature)
        assert part.logprobs.shape == part.batch.response_mask.shape
        torch.testing.assert_close(part.logprobs, expected, atol=1e-4, rtol=1e-4)
        assert (part.logprobs[part.batch.response_mask == 0] == 0).all()


@pytest.fixture(scope="module")
def runs(builtin_path, tmp_path_factory):
    """A tiny DPO run and a tiny ILQL run on the built-in task."""
    out = tmp_path_factory.mktemp("eval_runs")
    jobs = {
        "dpo": ("dpo.py", [*DPO_TINY, "--output-dir", str(out / "dpo")], {}),
        "ilql": ("ilql.py", [*ILQL_TINY, "--output-dir", str(out / "ilql")], {}),
    }
    for name, proc in run_pairs(jobs).items():
        assert proc.returncode == 0, f"{name}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return {name: next((out / name).iterdir()) for name in jobs}


def test_eval_of_a_run_against_sft_and_against_itself(runs, tmp_path):
    proc = launch("eval", str(runs["dpo"]), "--batch-size", "3")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((runs["dpo"] / "eval-vs-sft.json").read_text())
    assert summary["judge"] == "gold" and summary["prompts"] == 8  # the run's --eval-prompts
    assert "win rate against sft under gold" in proc.stdout and "| policy, greedy |" in proc.stdout
    assert summary["win_rate_low"] <= summary["win_rate"] <= summary["win_rate_high"]
    # The baseline is π_init itself: its KL estimate is zero to rounding (generate's cached pass vs a full one)
    assert abs(summary["baseline/kl_to_init"]) < 1e-3
    assert "baseline_greedy/kl_to_init" not in summary
    pairs = [json.loads(line) for line in (runs["dpo"] / "eval-vs-sft.jsonl").read_text().splitlines()]
    assert len(pairs) == 8 and set(pairs[0]) == {"prompt", "policy", "baseline", "policy_greedy", "baseline_greedy"}
    gold = [p["policy"]["gold"] for p in pairs]
    assert summary["policy/gold_score"] == pytest.approx(sum(gold) / 8, abs=1e-6)
    kl = [p["policy"]["kl_to_init"] for p in pairs]
    assert summary["policy/kl_to_init"] == pytest.approx(sum(kl) / 8, abs=1e-6)
    # The run against itself: the same seed (and batches) draw the same responses, every prompt a tie; judged by the
    # reward model
    again = evaluate.evaluate_run(
        str(runs["dpo"]), baseline=str(runs["dpo"]), judge="builtin", batch_size=3, out=str(tmp_path / "e.jsonl")
    )
    assert (again["win_rate"], again["win_rate_low"], again["win_rate_high"]) == (0.5, 0.5, 0.5)
    assert again["policy/reward"] == pytest.approx(summary["policy/reward"], abs=1e-5)


class OnAnotherDevice(torch.Tensor):
    """A CPU tensor that acts as one on another device (a GPU's beside the CPU's): an op that mixes it with an ordinary
    tensor of one or more dimensions raises as torch does there, and .cpu() returns an ordinary tensor."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cpu:
            with torch._C.DisableTorchFunctionSubclass():
                return args[0].as_subclass(torch.Tensor)
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if any(isinstance(t, cls) for t in tensors) and any(not isinstance(t, cls) and t.dim() for t in tensors):
            raise RuntimeError("Expected all tensors to be on the same device")
        return super().__torch_function__(func, types, args, kwargs)


def test_eval_keeps_no_graph_and_brings_the_devices_together(runs, tmp_path, monkeypatch):
    """evaluate_run with every module call checked (tests/no_graph/graph_guard.py: a pass in eval mode that builds an
    autograd graph raises, as π_init's passes outside torch.no_grad() did), and with the responses' log-probs on
    "another device" than π_init's (OnAnotherDevice: the policy samples on a GPU, π_init runs on `init_device`, here
    the CPU): the KL to π_init must bring both to one device before subtracting them, as on CUDA."""
    with pytest.raises(RuntimeError, match="same device"):  # the stand-in does fail where devices differ
        torch.ones(2).as_subclass(OnAnotherDevice) - torch.ones(2)
    sys.path.insert(0, str(ROOT / "tests" / "no_graph"))
    import graph_guard

    monkeypatch.setattr(torch.nn.Module, "__call__", graph_guard.checked_call)
    sample_for_eval = evaluate.sample_for_eval

    def sampled_elsewhere(*args, **kwargs):
        parts = sample_for_eval(*args, **kwargs)
        return [part._replace(logprobs=part.logprobs.as_subclass(OnAnotherDevice)) for part in parts]

    monkeypatch.setattr(evaluate, "sample_for_eval", sampled_elsewhere)
    summary = evaluate.evaluate_run(
        str(runs["dpo"]), prompts=4, batch_size=2, init_device="cpu", out=str(tmp_path / "e.jsonl"), show_progress=False
    )
    assert summary["prompts"] == 4 and abs(summary["baseline/kl_to_init"]) < 1e-3
    assert torch.isfinite(torch.tensor(summary["policy/kl_to_init"]))


def test_an_ilql_folder_decodes_with_its_heads(runs, tmp_path):
    """β = 0 is the LM's own distribution; β > 0 shifts it by the heads' advantages, which moves it away from π_init."""
    at = {
        beta: evaluate.evaluate_run(str(runs["ilql"]), beta=beta, out=str(tmp_path / f"{beta}.jsonl"))
        for beta in (0, 8)
    }
    assert at[0]["policy/kl_to_init"] != at[8]["policy/kl_to_init"]
    rows = {
        beta: [json.loads(line) for line in (tmp_path / f"{beta}.jsonl").read_text().splitlines()] for beta in (0, 8)
    }
    assert [r["policy"]["response"] for r in rows[0]] != [r["policy"]["response"] for r in rows[8]]
    # The LM alone, without the heads, draws the same responses as β = 0
    lm_only = tmp_path / "lm_only"
    (lm_only / "policy").mkdir(parents=True)
    for f in (runs["ilql"] / "policy").iterdir():
        if f.name != "ilql_heads.safetensors":
            (lm_only / "policy" / f.name).symlink_to(f)
    (lm_only / "args.json").symlink_to(runs["ilql"] / "args.json")
    plain = evaluate.evaluate_run(str(lm_only), out=str(tmp_path / "plain.jsonl"))
    assert plain["policy/gold_score"] == pytest.approx(at[0]["policy/gold_score"], abs=1e-6)


def test_eval_bad_input_is_one_line(runs, tmp_path):
    (tmp_path / "args.json").write_text((runs["dpo"] / "args.json").read_text())
    assert "has no policy/ folder" in error_line(launch("eval", str(tmp_path)))
    args = json.loads((runs["dpo"] / "args.json").read_text())
    (tmp_path / "policy").symlink_to(runs["dpo"] / "policy")
    (tmp_path / "args.json").write_text(json.dumps({**args, "dataset": str(tmp_path / "prompts.jsonl")}))
    assert "pass --judge" in error_line(launch("eval", str(tmp_path)))


def test_compare_offline_prints_one_table(builtin_path, tmp_path):
    tiny = "--eval-prompts 8 --max-new-tokens 12".split()
    proc = launch(
        "compare",
        "--offline",
        "--steps",
        "64",
        "--seeds",
        "1",
        "--methods",
        "nll ilql",
        "--out",
        str(tmp_path),
        "--",
        *tiny,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    table = (tmp_path / "table.md").read_text()
    assert table in proc.stdout
    for row in ("| SFT (π_init) | – |", "| nll | 1 |", "| ilql β=1 | 1 |", "| ilql β=4 | 1 |"):
        assert row in table
    assert "dpo" not in table
    assert sorted(p.name for p in (tmp_path / "eval").glob("*.json")) == [
        "ilql_beta_1-1.json",
        "ilql_beta_4-1.json",
        "nll-1.json",
    ]
    assert "multiple of 64" in launch("compare", "--offline", "--steps", "50").stderr
