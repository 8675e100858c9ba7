"""ilql.py's LM head and vocabulary-wide Q heads over chunks of response positions (ILQLModel's `chunk`, picked by
ilql_chunk_size from common.LOGPROB_CHUNK, --logprob-chunk): the same loss terms, per-token values and gradients of
the LM and the heads as one pass, on ragged rows (left-padded prompts, right-padded responses); no
[heads, rows, positions, vocabulary] tensor is kept for the backward pass; update() chunks by the same rule as
forward_logprobs and takes the same optimiser step."""

import copy

import pytest
import torch
from conftest import tiny_lm

import common
import ilql

VOCAB = 37  # unlike every other last dimension of the tiny models (hidden 16, the heads' 32)
PROMPT_LENS = [3, 6, 1, 4]
RESPONSE_LENS = [7, 2, 9, 1]


def ragged_rows():
    """A common.Batch whose padding slots hold other ids than the pad's (only the masks decide what is padding),
    and rewards on each response's last token (garbage in the padding, which must not count)."""
    g = torch.Generator().manual_seed(1)
    width_q = max(PROMPT_LENS)
    width_r = max(RESPONSE_LENS)
    query_ids = torch.randint(1, VOCAB, (len(PROMPT_LENS), width_q), generator=g)
    response_ids = torch.randint(1, VOCAB, (len(PROMPT_LENS), width_r), generator=g)
    query_mask = torch.zeros_like(query_ids)
    response_mask = torch.zeros(len(PROMPT_LENS), width_r)
    rewards = torch.randn(len(PROMPT_LENS), width_r, generator=g) * 50  # garbage, but on the last token
    for i, (p, r) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS)):
        query_mask[i, width_q - p :] = 1
        response_mask[i, :r] = 1
        rewards[i, r - 1] = float(i) - 1.5
    return common.Batch(query_ids, query_mask, response_ids, response_mask), rewards


def models(kind: str):
    """An ILQLModel and target Q heads away from its Q heads (so that the V and AWAC terms have gradients)."""
    model = ilql.ILQLModel(tiny_lm(kind, VOCAB))
    target_q_heads = copy.deepcopy(model.q_heads).requires_grad_(False)
    torch.nn.init.normal_(target_q_heads[0][2].weight)
    return model, target_q_heads


def loss_and_grads(model, target_q_heads, rows, rewards, chunk):
    """ILQL's loss as update() computes it for one micro-batch, its per-token inputs, and the gradients of the LM and
    the heads."""
    model.zero_grad(set_to_none=True)
    ids, mask, pos = common.concat_inputs(*rows, device="cpu")
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, actions=rows.response_ids, chunk=chunk)
    target_q = ilql.target_q_values(target_q_heads, out.hidden[:, :-1], rows.response_ids, chunk=chunk)
    losses = ilql.ilql_loss(
        logprobs=out.logprobs,
        q=out.q,
        q_cross_entropy=out.q_cross_entropy,
        target_q=target_q,
        values=out.values,
        rewards=rewards,
        response_mask=rows.response_mask,
        gamma=0.9,
        tau=0.7,
        cql_scale=0.3,
        awac_scale=1.0,
        beta_train=0.5,
    )
    losses.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    per_token = [out.values, out.logprobs, out.q, out.q_cross_entropy, target_q]
    return losses, [t.detach() for t in per_token], grads


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_chunks_give_the_loss_and_gradients_of_one_pass(kind):
    model, target_q_heads = models(kind)
    rows, rewards = ragged_rows()
    whole, whole_tokens, whole_grads = loss_and_grads(model, target_q_heads, rows, rewards, chunk=0)
    # every part trains: the LM's blocks and head, V and both Q heads
    assert {n.split(".")[0] for n in whole_grads} == {"lm", "v_head", "q_heads"}
    assert all(whole_grads[f"q_heads.{i}.2.weight"].abs().max() > 1e-3 for i in range(2))
    for chunk in (1, 3, 100):  # one position, a chunk that does not divide the 9 positions, one chunk of all
        losses, tokens, grads = loss_and_grads(model, target_q_heads, rows, rewards, chunk=chunk)
        for name, a, b in zip(ilql.ILQLLoss._fields, losses, whole):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
        for a, b in zip(tokens, whole_tokens):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert grads.keys() == whole_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], whole_grads[name], atol=1e-5, rtol=1e-5, msg=name)


def test_the_graph_keeps_no_vocabulary_wide_tensor_and_the_heads_see_one_chunk_at_a_time():
    """What the forward saves for backward (outside the recomputed chunks) holds no tensor with a vocabulary-sized
    last dimension; the LM head and each Q head run on at most `chunk` positions, the target heads too. One pass
    saves such tensors."""
    model, target_q_heads = models("gpt2")
    rows, rewards = ragged_rows()
    calls = {"lm_head": [], "q": [], "target": []}
    model.lm.lm_head.register_forward_hook(lambda m, inputs, out: calls["lm_head"].append(inputs[0].shape[1]))
    model.q_heads[1].register_forward_hook(lambda m, inputs, out: calls["q"].append(inputs[0].shape[1]))
    target_q_heads[0].register_forward_hook(lambda m, inputs, out: calls["target"].append(inputs[0].shape[1]))

    def saved_vocabulary_wide(chunk):
        shapes = []

        def pack(t):
            if t.dim() >= 3 and t.shape[-1] == VOCAB:
                shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_and_grads(model, target_q_heads, rows, rewards, chunk=chunk)
        return shapes

    assert saved_vocabulary_wide(0)  # the hook sees the whole logits where they are kept
    for chunk_calls in calls.values():
        chunk_calls.clear()
    assert saved_vocabulary_wide(3) == []
    width = rows.response_ids.shape[1]
    assert max(calls["lm_head"]) <= 3 and sum(calls["lm_head"]) == 2 * width  # each chunk forward, then recomputed
    assert max(calls["q"]) <= 3 and sum(calls["q"]) == 2 * width
    assert max(calls["target"]) <= 3 and sum(calls["target"]) == width  # no gradient: once


def test_chunk_size_follows_the_logprob_chunk_rule(monkeypatch):
    model, _ = models("llama")
    # auto: a micro-batch's LM and two Q heads' logits, 3 × 4 rows × 9 positions × 37 floats, take one pass
    assert ilql.ilql_chunk_size(model, rows=4, width=9) == 0
    monkeypatch.setattr(common, "LOGPROB_CHUNK_FLOATS", 3 * 4 * VOCAB * 2)  # two positions of the three logits
    assert ilql.ilql_chunk_size(model, rows=4, width=9) == 2
    monkeypatch.setattr(common, "LOGPROB_CHUNK", 0)
    assert ilql.ilql_chunk_size(model, rows=4, width=9) == 0
    monkeypatch.setattr(common, "LOGPROB_CHUNK", 5)
    assert ilql.ilql_chunk_size(model, rows=4, width=9) == 5
    model.lm.config.final_logit_softcapping = 30.0  # the LM's logits are not its head's: one pass
    assert ilql.ilql_chunk_size(model, rows=4, width=9) == 0


def test_update_with_chunks_takes_the_step_of_one_pass(monkeypatch):
    """update(), with accumulation over micro-batches of 2: --logprob-chunk 2 runs the Q heads on 2 positions at a
    time and ends at the parameters (and the logged terms) of --logprob-chunk 0."""
    model, target_q_heads = models("gpt2")
    model.device = torch.device("cpu")
    rows, rewards = ragged_rows()

    def step(chunk):
        monkeypatch.setattr(common, "LOGPROB_CHUNK", chunk)
        trained = copy.deepcopy(model)
        widths = []
        trained.q_heads[0].register_forward_hook(lambda m, inputs, out: widths.append(inputs[0].shape[1]))
        engine = common.TorchEngine(trained, lr=1e-2, eps=0.1, max_grad_norm=1e9, accumulation_steps=2)
        args = ilql.Args(micro_batch_size=2, mini_batch_size=4, beta_train=0.5, progress=False)
        idx = torch.tensor([2, 0, 3, 1])
        losses = ilql.update(engine, target_q_heads, data=rows, rewards=rewards, idx=idx, args=args, device="cpu")
        return losses, [p.detach().clone() for p in trained.parameters()], widths

    whole_losses, whole, widths = step(0)
    assert max(widths) == rows.response_ids.shape[1] + 1  # one pass: every state s_0..s_T at once
    chunked_losses, chunked, widths = step(2)
    assert max(widths) <= 2
    for a, b in zip(whole_losses, chunked_losses):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    moved = max((a - b).abs().max().item() for a, b in zip(whole, model.parameters()))
    assert moved > 1e-3
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
