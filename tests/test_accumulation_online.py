"""Gradient accumulation (--micro-batch-size) in ppo.py, apa.py, awr.py and grpo.py: optimiser steps over mini-batches
of 8 ragged rows equal the same steps accumulated over micro-batches of 2, each micro-batch's loss weighted by its
share of the mini-batch (parameters after the steps to 1e-5, on a tiny Llama policy and value model), and the logged
statistics are the mini-batch's. AdamW's ε is as large as the gradients, so a wrong gradient scale changes the step
(Adam alone is nearly scale-invariant)."""

import pytest
import torch

import apa
import awr
import common
import grpo
import ppo

EPS = 0.1
VOCAB = 37
PROMPT_LENS = [3, 5, 1, 4, 2, 5, 3, 1, 4, 2, 5]
RESPONSE_LENS = [6, 1, 4, 2, 6, 3, 1, 5, 2, 4, 3]  # ragged: token shares differ from row shares


def _llama_config(**extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
        **extra,
    )


def _models():
    """(policy, value model): a tiny random Llama LM and a Llama with a 1-output head at every token."""
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(0)
    policy = LlamaForCausalLM(_llama_config())
    value_model = LlamaForSequenceClassification(_llama_config(num_labels=1))
    return policy, value_model


def _rows(n):
    """A Batch of n ragged rows (left-padded prompts, right-padded responses) and per-token tensors for the losses."""
    g = torch.Generator().manual_seed(1)
    width_q = max(PROMPT_LENS)
    width_r = max(RESPONSE_LENS)
    query_mask = torch.tensor([[0] * (width_q - q) + [1] * q for q in PROMPT_LENS[:n]])
    response_mask = torch.tensor([[1.0] * r + [0.0] * (width_r - r) for r in RESPONSE_LENS[:n]])
    batch = common.Batch(
        torch.randint(2, VOCAB, (n, width_q), generator=g) * query_mask + (1 - query_mask),
        query_mask,
        torch.randint(2, VOCAB, (n, width_r), generator=g),
        response_mask,
    )
    per_token = {key: torch.randn(n, width_r, generator=g) * response_mask for key in ("adv", "ret", "old", "ref")}
    per_token["old"] = per_token["old"] * 0.1 - 2.5  # log-probs near those of a 37-token vocabulary
    per_token["ref"] = per_token["ref"] * 0.1 - 3.5
    return batch, per_token


def _engines(accumulation_steps):
    policy, value_model = _models()
    return [
        common.TorchEngine(model, lr=1e-2, eps=EPS, accumulation_steps=accumulation_steps)
        for model in (policy, value_model)
    ]


def _params(*engines):
    return [p.detach().clone() for engine in engines for p in engine.module.parameters()]


def _assert_equal(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


def _differ(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b)) > 1e-4


# ---- APA and AWR: their update pass itself, online rows (8) and offline rows whose last mini-batch is short (11)
def _update(module, n_rows, micro_batch_size, accumulation_steps):
    policy, value_model = _engines(accumulation_steps)
    batch, t = _rows(n_rows)
    models = module.Models(policy=policy, ref_policy=None, value_model=value_model, rewards=[], reward_weights=[])
    args = module.Args(mini_batch_size=8, micro_batch_size=micro_batch_size)
    sampler = torch.Generator().manual_seed(3)
    metrics = [
        module.update(
            models,
            batch,
            advantages=t["adv"],
            returns=t["ret"],
            ref_logprobs=t["ref"],
            sampler=sampler,
            args=args,
            device=torch.device("cpu"),
        )
        for _ in range(2)
    ]
    return _params(policy, value_model), metrics


@pytest.mark.parametrize("module", [apa, awr])
@pytest.mark.parametrize("n_rows", [8, 11])
def test_apa_awr_update_accumulated_equals_one_pass(module, n_rows, monkeypatch):
    whole, whole_metrics = _update(module, n_rows, micro_batch_size=0, accumulation_steps=1)
    accumulated, metrics = _update(module, n_rows, micro_batch_size=2, accumulation_steps=4)
    _assert_equal(whole, accumulated)
    for a, b in zip(whole_metrics, metrics):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    stepping_each, _ = _update(module, n_rows, micro_batch_size=2, accumulation_steps=1)
    assert _differ(whole, stepping_each)
    monkeypatch.setattr(common, "token_share", lambda micro, mini: len(micro) / len(mini))  # rows, not tokens
    by_rows, _ = _update(module, n_rows, micro_batch_size=2, accumulation_steps=4)
    assert _differ(whole, by_rows)


def test_accumulation_passes_split_a_short_mini_batch_into_as_many_passes():
    args = apa.Args(mini_batch_size=8, micro_batch_size=2)
    full = apa.accumulation_passes(torch.arange(8), args)
    assert [m.tolist() for m, _ in full] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    short = apa.accumulation_passes(torch.arange(8, 11), args)
    assert [(m.tolist(), counts) for m, counts in short] == [([8], True), ([9], True), ([10], True), ([8], False)]
    assert [m.tolist() for m, _ in apa.accumulation_passes(torch.arange(3), apa.Args(mini_batch_size=8))] == [[0, 1, 2]]


# ---- PPO: mini_batch_step (ppo_loss, the entropy bonus, --kl-in-loss and PPO-ptx), rows of a shuffled rollout
def _ppo_steps(micro_batch_size, accumulation_steps):
    policy, value_model = _engines(accumulation_steps)
    batch, t = _rows(11)
    models = ppo.Models(policy=policy, ref_policy=None, value_model=value_model, rewards=[], reward_weights=[])
    args = ppo.Args(
        mini_batch_size=8,
        micro_batch_size=micro_batch_size,
        entropy_coef=0.01,
        ptx_coef=0.5,
        kl_estimator="k3",
    )
    ptx = common.pad_left([[2 + (i * j) % 30 for j in range(2 + i % 4)] for i in range(8)], 1, None)
    idx = torch.tensor([9, 2, 7, 0, 10, 4, 5, 1])  # rows of the rollout, in a shuffled order, as in the loop
    logged = [
        ppo.mini_batch_step(
            models,
            batch,
            idx,
            old_logprobs=t["old"],
            old_values=t["ret"] * 0.5,
            advantages=t["adv"],
            returns=t["ret"],
            ref_logprobs=t["ref"],
            kl_coef=0.1,
            ptx=ptx,
            args=args,
        )
        for _ in range(2)
    ]
    return _params(policy, value_model), logged


def test_ppo_mini_batch_step_accumulated_equals_one_pass(monkeypatch):
    whole, whole_stats = _ppo_steps(0, 1)
    accumulated, stats = _ppo_steps(2, 4)
    _assert_equal(whole, accumulated)
    assert {"policy/kl_loss", "policy/ptx_loss", "policy/entropy"} <= set(stats[0])
    # A clip fraction counts tokens where clipped and unclipped losses differ, and V_old + clamp(V − V_old) rounds
    # away from V by an ulp within the clip range, so the batch shape may flip a token's count: one token at most
    one_token = 1 / _rows(11)[0].response_mask[[9, 2, 7, 0, 10, 4, 5, 1]].sum().item()
    for a, b in zip(whole_stats, stats):
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=one_token + 1e-6 if "clipfrac" in key else 1e-6), key
    assert _differ(whole, _ppo_steps(2, 1)[0])
    monkeypatch.setattr(common, "token_share", lambda micro, mini: len(micro) / len(mini))  # rows, not tokens
    assert _differ(whole, _ppo_steps(2, 4)[0])


# ---- GRPO: each aggregation, and GSPO's sequence ratio, with the k3 term, weighted by grpo.micro_shares
def _grpo_steps(aggregation, importance, micro_batch_size, accumulation_steps, shares_of=grpo.micro_shares):
    policy, _ = _engines(accumulation_steps)
    batch, t = _rows(8)
    args = grpo.Args(loss_aggregation=aggregation, importance=importance, max_new_tokens=max(RESPONSE_LENS))
    advantages = t["adv"][:, 0]
    idx = torch.arange(8)
    logged = []
    for _ in range(2):
        stats = {}
        for micro in common.micro_batches(idx, micro_batch_size):
            shares = shares_of(batch.response_mask[micro], batch.response_mask[idx], args=args)
            rows = batch.rows(micro)
            terms = grpo.grpo_loss(
                logprobs=common.forward_logprobs(policy, *rows),
                old_logprobs=t["old"][micro],
                advantages=advantages[micro],
                response_mask=rows.response_mask,
                cliprange_low=0.2,
                cliprange_high=0.28,
                aggregation=aggregation,
                importance=importance,
                max_tokens=args.max_new_tokens,
                ref_logprobs=t["ref"][micro],
                kl_coef=0.1,
            )
            loss = shares.policy * terms.policy_loss + 0.1 * (shares.kl * terms.kl_loss)
            for key, share in (("policy_loss", shares.policy), ("kl_loss", shares.kl), ("approx_kl", shares.tokens)):
                stats[key] = stats.get(key, 0.0) + share * getattr(terms, key).item()
            stats["clipfrac"] = stats.get("clipfrac", 0.0) + shares.clip * terms.clipfrac.item()
            policy.backward(loss, scale_wrt_gas=False)
            policy.step()
        logged.append(stats)
    return _params(policy), logged


@pytest.mark.parametrize(
    "aggregation, importance",
    [("sequence_mean", "token"), ("token_mean", "token"), ("constant", "token"), ("token_mean", "sequence")],
)
def test_grpo_aggregations_accumulated_equal_one_pass(aggregation, importance):
    whole, whole_stats = _grpo_steps(aggregation, importance, 0, 1)
    accumulated, stats = _grpo_steps(aggregation, importance, 2, 4)
    _assert_equal(whole, accumulated)
    for a, b in zip(whole_stats, stats):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    assert _differ(whole, _grpo_steps(aggregation, importance, 2, 1)[0])

    def swapped(micro_mask, mini_mask, *, args):  # each share the other kind: rows for tokens, tokens for rows
        right = grpo.micro_shares(micro_mask, mini_mask, args=args)
        rows = len(micro_mask) / len(mini_mask)
        tokens = common.token_share(micro_mask, mini_mask)
        return right._replace(**{k: tokens if v == rows else rows for k, v in right._asdict().items()})

    assert _differ(whole, _grpo_steps(aggregation, importance, 2, 4, shares_of=swapped)[0])


def test_grpo_micro_shares_per_aggregation():
    """One row of 4 tokens out of 4 rows of 10 tokens: its row share 0.25, its token share 0.4."""
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]])
    expected = {  # (policy, kl, tokens, clip)
        ("sequence_mean", "token"): (0.25, 0.25, 0.4, 0.4),
        ("token_mean", "token"): (0.4, 0.4, 0.4, 0.4),
        ("constant", "token"): (0.25, 0.25, 0.4, 0.4),
        ("token_mean", "sequence"): (0.25, 0.4, 0.4, 0.25),
        ("constant", "sequence"): (0.25, 0.25, 0.4, 0.25),
    }
    for (aggregation, importance), shares in expected.items():
        args = grpo.Args(loss_aggregation=aggregation, importance=importance)
        assert grpo.micro_shares(mask[:1], mask, args=args) == pytest.approx(shares), (aggregation, importance)
