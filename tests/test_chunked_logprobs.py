"""forward_logprobs over chunks of response positions (common.LOGPROB_CHUNK, its `chunk` keyword): the same
log-probs, entropies and gradients as one pass of the whole model, on ragged rows (left-padded prompts,
right-padded responses), with temperature and the repetition penalty; no [rows, positions, vocabulary] tensor is
kept for the backward pass."""

import pytest
import torch
from conftest import tiny_lm

import common

VOCAB = 37  # small, so that responses repeat tokens and the repetition penalty changes many logits
PROMPT_LENS = [3, 6, 1, 4]
RESPONSE_LENS = [7, 2, 9, 1]


def ragged_rows():
    """(query_ids, query_mask, response_ids, response_mask): padding slots hold other ids than the pad's, so only the
    masks decide what is padding."""
    g = torch.Generator().manual_seed(1)
    width_q = max(PROMPT_LENS)
    width_r = max(RESPONSE_LENS)
    query_ids = torch.randint(0, VOCAB, (len(PROMPT_LENS), width_q), generator=g)
    response_ids = torch.randint(0, 8, (len(PROMPT_LENS), width_r), generator=g)  # 8 ids: repeats in every row
    query_mask = torch.zeros_like(query_ids)
    response_mask = torch.zeros_like(response_ids)
    for i, (p, r) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS)):
        query_mask[i, width_q - p :] = 1
        response_mask[i, :r] = 1
    return query_ids, query_mask, response_ids, response_mask


def values_and_grads(model, rows, chunk, **settings):
    """forward_logprobs's outputs and the gradients of a weighted sum of them (train mode, a graph)."""
    model.zero_grad(set_to_none=True)
    out = common.forward_logprobs(model, *rows, chunk=chunk, **settings)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(2)
    loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs if o.requires_grad)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [o.detach() for o in outs], grads


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize(
    "settings",
    [
        {"temperature": 0.7, "repetition_penalty": 1.3},
        {"temperature": 1.3, "repetition_penalty": 1.0, "with_entropy": True},
        {"temperature": 0.7, "repetition_penalty": 1.3, "with_entropy": True},
        {"temperature": 0.7, "repetition_penalty": 1.3, "with_entropy": True, "entropy_grad": False},
    ],
)
def test_chunks_give_the_values_and_gradients_of_one_pass(kind, settings):
    model = tiny_lm(kind, VOCAB)
    rows = ragged_rows()
    whole, whole_grads = values_and_grads(model, rows, chunk=0, **settings)
    # the check has teeth: the penalty and the temperature change the log-probs by far more than the tolerance
    plain, _ = values_and_grads(model, rows, chunk=0, with_entropy=settings.get("with_entropy", False))
    assert (whole[0] - plain[0]).abs().max() > 1e-2
    for chunk in (1, 4, 100):  # one position, a chunk that does not divide the 9 positions, one chunk of all
        got, grads = values_and_grads(model, rows, chunk=chunk, **settings)
        assert len(got) == len(whole)
        for a, b in zip(got, whole):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
            assert (a[rows[3] == 0] == 0).all()  # padding exactly 0
        assert grads.keys() == whole_grads.keys() and len(grads) > 3
        for name in grads:
            torch.testing.assert_close(grads[name], whole_grads[name], atol=1e-5, rtol=0, msg=name)


def test_no_grad_chunks_give_the_one_pass_values():
    model = tiny_lm("llama", VOCAB).eval()
    rows = ragged_rows()
    with torch.no_grad():
        whole = common.forward_logprobs(model, *rows, temperature=0.7, repetition_penalty=1.3, with_entropy=True)
        got = common.forward_logprobs(model, *rows, temperature=0.7, repetition_penalty=1.3, with_entropy=True, chunk=2)
    for a, b in zip(got, whole):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_the_graph_keeps_no_whole_logits_and_the_head_sees_one_chunk_at_a_time():
    """What the forward saves for backward (outside the recomputed chunks) holds no tensor with a vocabulary-sized
    last dimension; the head is called on at most `chunk` positions. One unchunked pass saves such tensors."""
    model = tiny_lm("gpt2", VOCAB)
    rows = ragged_rows()
    calls = []
    model.lm_head.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[1]))

    def saved_logit_shapes(chunk):
        shapes = []

        def pack(t):
            if t.dim() == 3 and t.shape[-1] == VOCAB:
                shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = common.forward_logprobs(model, *rows, chunk=chunk, temperature=0.7, with_entropy=True)
        sum(o.sum() for o in out).backward()
        return shapes

    assert saved_logit_shapes(0)  # the hook sees the whole logits where they are kept
    calls.clear()
    assert saved_logit_shapes(3) == []
    width = rows[2].shape[1]
    assert calls and max(calls) <= 3 and sum(calls) == 2 * width  # each chunk once forward, once recomputed


def test_auto_chunks_only_large_logits_and_never_a_transformed_head(monkeypatch):
    model = tiny_lm("llama", VOCAB)
    assert common.logprob_chunk_size(model, rows=4, width=9, chunk="auto") == 0  # 4 × 9 × 37 floats: one pass
    monkeypatch.setattr(common, "LOGPROB_CHUNK_FLOATS", 4 * VOCAB * 2)
    assert common.logprob_chunk_size(model, rows=4, width=9, chunk="auto") == 2
    assert common.logprob_chunk_size(model, rows=4, width=9, chunk=0) == 0
    assert common.logprob_chunk_size(model, rows=4, width=9, chunk=5) == 5
    model.config.final_logit_softcapping = 30.0  # logits = cap · tanh(head / cap): not the head alone
    assert common.logprob_chunk_size(model, rows=4, width=9, chunk=5) == 0
    # the module setting is the default of forward_logprobs: the head then sees chunks of 2 positions
    del model.config.final_logit_softcapping
    calls = []
    model.lm_head.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[1]))
    with torch.no_grad():
        common.forward_logprobs(model, *ragged_rows())
    assert calls == [2, 2, 2, 2, 1]


def test_chunks_with_a_lora_adapter_on_the_head_and_with_it_switched_off():
    """With LoRA (here also on the LM head, so that the chunks must call the adapted head) the chunks give the one
    pass's log-probs and adapter gradients, and under adapter_off (π_ref) the base model's log-probs."""
    base = tiny_lm("llama", VOCAB)
    rows = ragged_rows()
    with torch.no_grad():
        expected_ref = common.forward_logprobs(base, *rows, temperature=0.7, chunk=0)
    model = common.add_lora(base, "causal", r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "lm_head"])
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # B starts at 0; a random B makes the adapter change the log-probs
            torch.nn.init.normal_(parameter, std=0.5)
    settings = {"temperature": 0.7, "repetition_penalty": 1.3, "with_entropy": True}
    whole, whole_grads = values_and_grads(model, rows, chunk=0, **settings)
    got, grads = values_and_grads(model, rows, chunk=4, **settings)
    assert any("lm_head" in name for name in grads) and all("lora_" in name for name in grads)
    for a, b in zip(got, whole):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], whole_grads[name], atol=1e-5, rtol=0, msg=name)
    with torch.no_grad(), common.adapter_off(model):
        off = common.forward_logprobs(model, *rows, temperature=0.7, chunk=4)
    torch.testing.assert_close(off, expected_ref, atol=1e-5, rtol=0)
    assert (off - common.forward_logprobs(model, *rows, temperature=0.7, chunk=4).detach()).abs().max() > 1e-2


def test_a_run_reads_the_flag_before_it_loads_anything():
    """start_run hands --logprob-chunk to set_logprob_chunk: a negative value stops the run with one line."""
    from conftest import error_line, run_script

    proc = run_script("apa.py", "--logprob-chunk", "-2", check=False)
    assert "--logprob-chunk -2: pass auto, 0 (never chunk) or a positive number" in error_line(proc)


def test_set_logprob_chunk_is_what_forward_logprobs_reads(monkeypatch):
    """start_run's set_logprob_chunk(--logprob-chunk) sets the chunk of every later forward_logprobs."""
    model = tiny_lm("gpt2", VOCAB)
    monkeypatch.setattr(common, "LOGPROB_CHUNK", common.LOGPROB_CHUNK)
    seen = []
    size = common.logprob_chunk_size
    monkeypatch.setattr(
        common, "logprob_chunk_size", lambda *a, chunk, **k: seen.append(chunk) or size(*a, chunk=chunk, **k)
    )
    batch = ragged_rows()
    common.set_logprob_chunk(5)
    common.forward_logprobs(model, *batch)
    common.set_logprob_chunk("auto")
    common.forward_logprobs(model, *batch)
    assert seen == [5, "auto"]
    with pytest.raises(SystemExit, match="--logprob-chunk -1: pass auto"):
        common.set_logprob_chunk(-1)
