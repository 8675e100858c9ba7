"""Gradient accumulation (--micro-batch-size) in the offline scripts: each script's update() over a mini-batch of 8
ragged rows (pairs for dpo.py, rankings for pro.py) in micro-batches of 2 on an engine that accumulates 4 of them
takes the same optimiser steps, and logs the same statistics, as one pass over the whole mini-batch; stepping after
every micro-batch, or leaving out the micro-batches' share weights, does not."""

import copy

import torch
from test_common import tiny_causal_lm, word_tokenizer

import alol
import common
import dpo
import ilql
import pro

EPS = 0.1  # AdamW's ε as large as the gradients: the step depends on the gradient's scale, not only its direction
# (and no gradient-norm clipping, which would hide a wrong scale too)
STEPS = 2  # optimiser steps, each on the same mini-batch


class Unweighted(common.TorchEngine):
    """An engine that undoes the share weights of equal micro-batches (each micro-batch's loss counted whole): the
    accumulated gradient is then accumulation_steps times too large."""

    def backward(self, loss, scale_wrt_gas=True):
        super().backward(loss * self.accumulation_steps, scale_wrt_gas)


def ragged_rows(n, seed, vocab=64):
    """n rows of (left-padded prompt of 1-5 tokens | right-padded response of 1-6 tokens) as a common.Batch."""
    g = torch.Generator().manual_seed(seed)
    prompt_lengths = torch.randint(1, 6, (n,), generator=g)
    response_lengths = torch.randint(1, 7, (n,), generator=g)
    query_ids = torch.randint(1, vocab, (n, 5), generator=g)
    response_ids = torch.randint(1, vocab, (n, 6), generator=g)
    query_mask = (torch.arange(5) >= 5 - prompt_lengths[:, None]).long()
    response_mask = (torch.arange(6) < response_lengths[:, None]).float()
    return common.Batch(query_ids, query_mask, response_ids, response_mask)


def train(model, step_fn, *, micro_batch_size, accumulation_steps, engine_class=common.TorchEngine):
    """STEPS calls of step_fn(engine, micro_batch_size) on a copy of `model`: (parameters after, each call's result)."""
    model = copy.deepcopy(model)
    if not hasattr(model, "device"):  # engines read their model's device, as of a transformers model
        model.device = torch.device("cpu")
    engine = engine_class(model, lr=1e-2, eps=EPS, max_grad_norm=1e9, accumulation_steps=accumulation_steps)
    results = [step_fn(engine, micro_batch_size) for _ in range(STEPS)]
    return [p.detach().clone() for p in model.parameters()], results


def check(model, step_fn, values):
    """The accumulated run equals the whole mini-batch's (parameters, and the statistics `values` reads from a
    result); stepping every micro-batch, or without the share weights, differs."""
    whole, whole_results = train(model, step_fn, micro_batch_size=0, accumulation_steps=1)
    accumulated, accumulated_results = train(model, step_fn, micro_batch_size=2, accumulation_steps=4)
    for a, b in zip(whole, accumulated):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for a, b in zip(whole_results, accumulated_results):
        torch.testing.assert_close(values(a), values(b), atol=1e-5, rtol=1e-5)
    every_micro, _ = train(model, step_fn, micro_batch_size=2, accumulation_steps=1)
    unweighted, _ = train(model, step_fn, micro_batch_size=2, accumulation_steps=4, engine_class=Unweighted)
    for other in (every_micro, unweighted):
        assert max((a - b).abs().max().item() for a, b in zip(whole, other)) > 1e-4


def test_ilql_token_means_accumulate_over_micro_batches():
    rows = ragged_rows(8, seed=1)
    rewards = torch.zeros_like(rows.response_mask)
    rewards[torch.arange(8), rows.response_mask.sum(1).long() - 1] = torch.randn(
        8, generator=torch.Generator().manual_seed(2)
    )
    model = ilql.ILQLModel(tiny_causal_lm(seed=3))
    target_q_heads = copy.deepcopy(model.q_heads).requires_grad_(False)
    torch.nn.init.normal_(target_q_heads[0][2].weight)  # targets away from Q: the V and AWAC terms have gradients
    idx = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])

    def step(engine, micro_batch_size):
        args = ilql.Args(micro_batch_size=micro_batch_size, mini_batch_size=8, beta_train=0.5, progress=False)
        return ilql.update(engine, target_q_heads, data=rows, rewards=rewards, idx=idx, args=args, device="cpu")

    check(model, step, values=lambda losses: torch.stack(list(losses)))


def test_alol_row_means_accumulate_over_micro_batches():
    rows = ragged_rows(8, seed=4)
    g = torch.Generator().manual_seed(5)
    ref_logprobs = -torch.rand(8, 6, generator=g) * 8  # far from π_θ's for some rows: their weights clip
    scores = torch.rand(8, generator=g)
    advantages = torch.randn(8, generator=g)
    idx = torch.tensor([3, 0, 5, 3, 7, 1, 6, 2])  # priority sampling draws with replacement
    model = tiny_causal_lm(seed=6)
    for algorithm in ("a_lol", "a_lol_seq"):

        def step(engine, micro_batch_size, algorithm=algorithm):
            args = alol.Args(micro_batch_size=micro_batch_size, mini_batch_size=8, algorithm=algorithm, progress=False)
            return alol.update(
                engine,
                rows=rows,
                ref_logprobs=ref_logprobs,
                scores=scores,
                advantages=advantages,
                idx=idx,
                args=args,
                device="cpu",
            )

        check(model, step, values=lambda terms: torch.stack(list(terms)))


def test_dpo_pair_means_accumulate_over_micro_batches():
    rows = ragged_rows(16, seed=7)  # 8 pairs: chosen rows 0-7, rejected rows 8-15
    g = torch.Generator().manual_seed(8)
    ref_chosen_logps = -torch.rand(8, generator=g) * 10
    ref_rejected_logps = -torch.rand(8, generator=g) * 10
    idx = torch.tensor([6, 1, 4, 0, 7, 2, 5, 3])
    model = tiny_causal_lm(seed=9)
    for loss_type, label_smoothing in (("sigmoid", 0.1), ("ipo", 0.0)):

        def step(engine, micro_batch_size, loss_type=loss_type, label_smoothing=label_smoothing):
            args = dpo.Args(
                micro_batch_size=micro_batch_size,
                mini_batch_size=8,
                loss_type=loss_type,
                label_smoothing=label_smoothing,
                beta=0.5,
                progress=False,
            )
            return dpo.update(
                engine,
                rows=rows,
                idx=idx,
                ref_chosen_logps=ref_chosen_logps,
                ref_rejected_logps=ref_rejected_logps,
                response_lengths=rows.response_mask.sum(1),
                args=args,
                device="cpu",
            )

        check(model, step, values=lambda terms: torch.stack([terms.loss, *terms.stats]))


def test_pro_ranking_means_accumulate_over_micro_batches():
    tokenizer = word_tokenizer()
    g = torch.Generator().manual_seed(10)
    words = "a b c d e f g h".split()

    def text(low, high):
        return " ".join(words[i] for i in torch.randint(0, 8, (int(torch.randint(low, high, (1,), generator=g)),)))

    n_candidates = [3, 2, 3, 3, 1, 2, 3, 2]  # rankings of different lengths, one without a pair to rank
    prompts = [text(1, 5) for _ in n_candidates]
    candidates = [[text(1, 6) for _ in range(n)] + [None] * (3 - n) for n in n_candidates]
    rewards = torch.randint(0, 3, (8, 3), generator=g).float()  # ties among them
    encode = dict(max_prompt_length=8, max_new_tokens=8, context=32, chat_template=False)
    idx = torch.tensor([2, 7, 0, 4, 5, 1, 3, 6])
    model = tiny_causal_lm(seed=11)

    def step(engine, micro_batch_size):
        args = pro.Args(micro_batch_size=micro_batch_size, mini_batch_size=8, sft_weight=0.5, progress=False)
        done = pro.update(
            engine,
            tokenizer,
            prompts=prompts,
            candidates=candidates,
            rewards=rewards,
            idx=idx,
            encode=encode,
            args=args,
            device="cpu",
        )
        return done

    check(
        model,
        step,
        values=lambda done: torch.stack(
            [done.terms.loss, *done.terms.stats.values(), torch.tensor(float(done.tokens))]
        ),
    )
