"""The shared evaluation and per-iteration log of the online scripts (common.held_out_prompts, evaluate_held_out,
rollout_metrics, log_iteration), on hand-made rollouts: no model is loaded."""

import math
from types import SimpleNamespace

import pytest
import torch

import common


class WordTokenizer:
    """Just what the evaluation reads of a tokenizer: decode, keeping special tokens as they are."""

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(f"w{int(i)}" for i in ids)


def fake_rollout(prompt_rows, prompts):
    """A Rollout of random responses (the global RNG: the evaluation's fixed seed decides them), ragged lengths; the
    score of a row is its length, π_old − π_ref is 0.5 on every response token."""
    query_ids, query_mask = common.pad_left(prompt_rows, 0)
    n = len(prompt_rows)
    response_ids = torch.randint(3, 50, (n, 4))
    lengths = torch.randint(1, 5, (n,))
    response_mask = (torch.arange(4)[None, :] < lengths[:, None]).float()
    old_logprobs = -torch.rand(n, 4) * response_mask
    return common.Rollout(
        batch=common.Batch(query_ids, query_mask, response_ids, response_mask),
        scores=lengths.float(),
        ended=lengths < 4,
        old_logprobs=old_logprobs,
        ref_logprobs=old_logprobs - 0.5 * response_mask,
    )


class SampleLog:
    def __init__(self):
        self.rows = []

    def samples(self, step, rows):
        self.rows.append((step, rows))

    def __call__(self, step, metrics):
        self.rows.append((step, metrics))


def one_rank(tmp_path):
    return common.Run(rank=0, world_size=1, device=torch.device("cpu"), name="t", dir=str(tmp_path), script="t.py")


def test_evaluate_held_out_means_each_column_and_draws_alike_at_every_step(tmp_path):
    held_out = common.HeldOut(prompts=[[5, 6], [7], [8, 9, 10], [11], [12, 13]], texts=["a", "b", "c", "d", "e"])
    log = SampleLog()
    settings = dict(
        sample=fake_rollout,
        held_out=held_out,
        tokenizer=WordTokenizer(),
        batch_size=2,  # 2 + 2 + 1 prompts
        run=one_rank(tmp_path),
        args=SimpleNamespace(progress=False, log_samples=3),
        log=log,
    )
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    metrics = common.evaluate_held_out(1, gold_score=lambda texts: [len(t) / 10 for t in texts], **settings)
    assert torch.rand(1) == before  # the evaluation's own seed leaves the training draws as they were
    again = common.evaluate_held_out(2, gold_score=None, **settings)

    with torch.random.fork_rng():  # the same draws, by hand
        torch.manual_seed(10**6)
        parts = [fake_rollout(held_out.prompts[i : i + 2], held_out.texts[i : i + 2]) for i in (0, 2, 4)]
    lengths = torch.cat([p.batch.response_mask.sum(1) for p in parts])
    texts = [
        t for p in parts for t in common.decode_responses(WordTokenizer(), p.batch.response_ids, p.batch.response_mask)
    ]
    assert metrics["eval/reward"] == pytest.approx(lengths.mean().item())
    assert metrics["eval/response_length"] == pytest.approx(lengths.mean().item())
    assert metrics["eval/kl_to_ref"] == pytest.approx(0.5 * lengths.mean().item())
    assert metrics["eval/no_eos_fraction"] == pytest.approx((lengths == 4).float().mean().item())
    assert metrics["eval/gold_score"] == pytest.approx(sum(len(t) / 10 for t in texts) / 5)
    assert "eval/gold_score" not in again  # no gold score: no column
    assert {k: v for k, v in metrics.items() if k != "eval/gold_score"} == again  # the same draws at step 2
    step, rows = log.rows[0]
    assert step == 1 and [row["prompt"] for row in rows] == ["a", "b", "c"]  # the first --log-samples
    assert [row["response"] for row in rows] == texts[:3]
    assert set(rows[0]) == {"prompt", "rendered_prompt", "response", "score", "gold_score", "kl_to_ref"}


def test_rollout_metrics_and_log_iteration_evaluate_when_due(tmp_path, capsys):
    torch.manual_seed(1)
    sampled = fake_rollout([[5], [6, 7], [8]], ["a", "b", "c"])
    mask = sampled.batch.response_mask
    kl = {"k1": 0.5 * mask, "k3": 0.25 * mask}
    metrics = common.rollout_metrics(sampled, kl, tokenizer=WordTokenizer(), gold_score=None)
    assert metrics["rollout/kl_k1"] == pytest.approx(0.5 * mask.sum(1).mean().item())
    assert metrics["rollout/kl_k3"] == pytest.approx(0.25 * mask.sum(1).mean().item())
    expected = math.exp(-(sampled.old_logprobs.sum() / mask.sum()).item())
    assert metrics["rollout/perplexity"] == pytest.approx(expected)
    assert "rollout/gold_score" not in metrics
    metrics["rollout/kl_to_ref"] = metrics["rollout/kl_k1"]
    engine = SimpleNamespace(optimizer=SimpleNamespace(param_groups=[{"lr": 0.5}]))  # what current_lr reads
    evaluations = []
    log = SampleLog()
    for iteration in (1, 2, 3):
        common.log_iteration(
            dict(metrics),
            iteration=iteration,
            num_iterations=3,
            per_iteration=3,
            update_epochs=2,
            times=common.IterationTimes(start=0.0, rollout=1.0, update=2.0),
            evaluate=lambda step: evaluations.append(step) or {"eval/reward": float(step)},
            eval_history=[],
            policy=engine,
            run=one_rank(tmp_path),
            args=SimpleNamespace(eval_every=2),
            log=log,
            shown=" β 0.1000",
        )
    assert evaluations == [2, 3]  # every --eval-every iterations, and at the last
    logged = dict(log.rows)
    assert "eval/reward" in logged[2] and "eval/reward" not in logged[1]
    assert logged[1]["time/update_tokens_per_s"] == pytest.approx(metrics["rollout/response_length"] * 3 * 2 / 2.0)
    assert logged[1]["policy/learning_rate"] == 0.5
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 3 and printed[2].startswith("iter    3/3 score ")
    assert f"kl {metrics['rollout/kl_to_ref']:.2f} β 0.1000 len " in printed[2]  # the script's fields after the KL
    with pytest.raises(SystemExit, match="step 4: rollout/score = nan"):
        common.log_iteration(
            {**metrics, "rollout/score": float("nan")},
            iteration=4,
            num_iterations=4,
            per_iteration=3,
            update_epochs=2,
            times=common.IterationTimes(start=0.0, rollout=1.0, update=2.0),
            evaluate=None,
            eval_history=[],
            policy=engine,
            run=one_rank(tmp_path),
            args=SimpleNamespace(eval_every=2),
            log=log,
        )


def test_held_out_prompts_deal_equal_shares_to_the_ranks(tmp_path):
    tokenizer = common.load_tokenizer(common.resolve(common.BUILTIN, "sft"))
    texts = ["one two", "three", "four five", "six", "seven"]
    encode = dict(max_prompt_length=16, max_new_tokens=4, context=64)
    args = SimpleNamespace(eval_prompts=5, eval_split="test")
    shares = [
        common.held_out_prompts(
            tokenizer, texts, run=one_rank(tmp_path)._replace(rank=r, world_size=2), args=args, **encode
        )
        for r in (0, 1)
    ]
    assert [share.texts for share in shares] == [["one two", "four five"], ["three", "six"]]  # 4 of 5: equal shares
    assert len(shares[0].prompts) == len(shares[1].prompts) == 2
    with pytest.raises(SystemExit, match="fewer prompts than the 6 ranks"):
        common.held_out_prompts(tokenizer, texts, run=one_rank(tmp_path)._replace(world_size=6), args=args, **encode)
