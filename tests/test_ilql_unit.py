"""ilql.py's pieces against hand-computed values and Python loops: the four loss terms on ragged masks, the Polyak
update, the β-shifted decoding as a transformers LogitsProcessor, and the paper presets."""

import dataclasses
import math

import pytest
import torch
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

import ilql

GAMMA, TAU = 0.9, 0.7
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])  # ragged, one full row


def _inputs(seed=0, vocab=5):
    g = torch.Generator().manual_seed(seed)
    B, T = MASK.shape
    logits, q_logits, tq_logits = (
        torch.randn(*s, generator=g) for s in ((B, T, vocab), (2, B, T, vocab), (2, B, T, vocab))
    )
    values = torch.randn(B, T + 1, generator=g)
    actions = torch.randint(vocab, (B, T), generator=g)
    rewards = torch.zeros(B, T)
    for b, n in enumerate(MASK.sum(1).long()):
        rewards[b, n - 1] = float(b) - 1.0  # the reward on the last real token
    rewards[0, 3] = 100.0  # garbage in the padding: must not count
    return logits, q_logits, tq_logits, values, actions, rewards


def _loss(inputs, *, response_mask, tau=TAU, cql_scale, awac_scale, beta_train):
    """ilql.ilql_loss on (logits, q_logits, target_q_logits, values, response_ids, rewards), the order _inputs
    returns them in: the vocabulary-wide logits read at the data's tokens by ilql.token_terms, as ILQLModel reads
    them, and the target heads' gathered at the data's tokens."""
    logits, q_logits, target_q_logits, values, response_ids, rewards = inputs
    terms = ilql.token_terms(logits, q_logits, response_ids)
    target_q = target_q_logits.gather(-1, response_ids.expand(len(target_q_logits), -1, -1)[..., None]).squeeze(-1)
    return ilql.ilql_loss(
        logprobs=terms.logprobs,
        q=terms.q,
        q_cross_entropy=terms.q_cross_entropy,
        target_q=target_q,
        values=values,
        rewards=rewards,
        response_mask=response_mask,
        gamma=GAMMA,
        tau=tau,
        cql_scale=cql_scale,
        awac_scale=awac_scale,
        beta_train=beta_train,
    )


def _loop_loss(logits, q_logits, tq_logits, values, actions, rewards, cql_scale, awac_scale, beta_train):
    """ILQL's four terms (ilql.py's docstring), one token at a time; every term a mean over the real tokens."""
    terms = {"q": 0.0, "v": 0.0, "cql": 0.0, "awac": 0.0}
    n = 0
    for b in range(MASK.shape[0]):
        length = int(MASK[b].sum())
        for t in range(length):
            a = int(actions[b, t])
            next_v = float(values[b, t + 1]) if t + 1 < length else 0.0  # terminal after the last token
            tq = min(float(tq_logits[i, b, t, a]) for i in range(2))
            v = float(values[b, t])
            terms["q"] += sum(
                (float(q_logits[i, b, t, a]) - (float(rewards[b, t]) + GAMMA * next_v)) ** 2 for i in range(2)
            )
            terms["v"] += (TAU if tq > v else 1 - TAU) * (tq - v) ** 2
            terms["cql"] += sum(-float(torch.log_softmax(q_logits[i, b, t], -1)[a]) for i in range(2))
            terms["awac"] += -float(torch.log_softmax(logits[b, t], -1)[a]) * math.exp(beta_train * (tq - v))
            n += 1
    terms = {k: v / n for k, v in terms.items()}
    return terms["q"] + terms["v"] + cql_scale * terms["cql"] + awac_scale * terms["awac"], terms


@pytest.mark.parametrize("beta_train", [0.0, 0.5])
def test_ilql_loss_matches_a_token_loop_on_ragged_masks(beta_train):
    inputs = _inputs()
    losses = _loss(inputs, response_mask=MASK, cql_scale=0.1, awac_scale=1.0, beta_train=beta_train)
    expected, terms = _loop_loss(*inputs, 0.1, 1.0, beta_train)
    assert losses.loss.item() == pytest.approx(expected, rel=1e-5)
    fields = {"q": "q_loss", "v": "value_loss", "cql": "cql_loss", "awac": "awac_loss"}
    for k in terms:
        assert getattr(losses, fields[k]).item() == pytest.approx(terms[k], rel=1e-5), k


def test_expectile_weights_tau_above_and_below():
    """One token each: tQ above V is weighted τ, tQ below V by 1 − τ."""
    mask = torch.ones(2, 1)
    tq_logits = torch.zeros(2, 2, 1, 3)
    tq_logits[:, 0, 0, 1] = 1.0  # row 0: tQ = 1 > V = 0  -> 0.7 · 1² = 0.7
    tq_logits[:, 1, 0, 1] = 0.0  # row 1: tQ = 0 < V = 2  -> 0.3 · 2² = 1.2
    values = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    inputs = (
        torch.zeros(2, 1, 3),
        torch.zeros(2, 2, 1, 3),
        tq_logits,
        values,
        torch.ones(2, 1, dtype=torch.long),
        torch.zeros(2, 1),
    )
    losses = _loss(inputs, response_mask=mask, tau=0.7, cql_scale=0.0, awac_scale=0.0, beta_train=0.0)
    assert losses.value_loss.item() == pytest.approx((0.7 + 1.2) / 2)
    losses = _loss(inputs, response_mask=mask, tau=0.2, cql_scale=0.0, awac_scale=0.0, beta_train=0.0)
    assert losses.value_loss.item() == pytest.approx((0.2 * 1 + 0.8 * 4) / 2)


def test_q_target_uses_the_next_state_value_and_zero_at_the_terminal():
    """Q ≡ 0, so loss_q = Σ_i mean (r_t + γ V(s_{t+1}) · [t+1 real])². Row 0 has 2 tokens, row 1 has 1."""
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    values = torch.tensor([[0.5, 2.0, 7.0], [3.0, 9.0, 9.0]], requires_grad=True)  # V(s_0..s_2)
    rewards = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    tq_logits = torch.zeros(2, 2, 2, 3)
    tq_logits[..., 0] = values.detach()[None, :, :2]  # tQ = V: the expectile term has no gradient
    inputs = (
        torch.zeros(2, 2, 3),
        torch.zeros(2, 2, 2, 3),
        tq_logits,
        values,
        torch.zeros(2, 2, dtype=torch.long),
        rewards,
    )
    losses = _loss(inputs, response_mask=mask, cql_scale=0.0, awac_scale=0.0, beta_train=0.0)
    # targets: row 0, t=0: 0 + γ·2.0; t=1: 1 + 0 (terminal, not γ·7.0); row 1, t=0: −1 + 0 (terminal, not γ·9.0)
    expected = 2 * ((GAMMA * 2.0) ** 2 + 1.0**2 + 1.0**2) / 3
    assert losses.q_loss.item() == pytest.approx(expected)
    losses.loss.backward()
    assert torch.all(values.grad == 0), "the Q target must not send gradient into V"


def test_cql_and_awac_terms_by_hand():
    """One token, vocab 2: CE(z, a) = log(1 + e^(z_other − z_a)); AWAC weight exp(β (tQ − V))."""
    q_logits = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2).repeat(2, 1, 1, 1)
    logits = torch.tensor([2.0, 0.0]).view(1, 1, 2)
    tq_logits = torch.tensor([0.0, 1.5]).view(1, 1, 1, 2).repeat(2, 1, 1, 1)
    values = torch.tensor([[0.5, 0.0]])
    inputs = (logits, q_logits, tq_logits, values, torch.tensor([[1]]), torch.zeros(1, 1))
    losses = _loss(inputs, response_mask=torch.ones(1, 1), cql_scale=0.1, awac_scale=1.0, beta_train=2.0)
    assert losses.cql_loss.item() == pytest.approx(2 * math.log(1 + math.exp(-1.0)), rel=1e-6)
    expected_awac = math.log(1 + math.exp(2.0)) * math.exp(2.0 * (1.5 - 0.5))
    assert losses.awac_loss.item() == pytest.approx(expected_awac, rel=1e-6)


def test_awac_weight_carries_no_gradient_into_the_heads():
    inputs = list(_inputs(1))
    values = inputs[3].clone().requires_grad_(True)
    inputs[3] = values
    losses = _loss(inputs, response_mask=MASK, cql_scale=0.0, awac_scale=1.0, beta_train=3.0)
    grad_with_awac = torch.autograd.grad(losses.loss, values)[0]
    losses = _loss(inputs, response_mask=MASK, cql_scale=0.0, awac_scale=0.0, beta_train=3.0)
    assert torch.allclose(grad_with_awac, torch.autograd.grad(losses.loss, values)[0])


def test_polyak_update():
    source, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.clone() for p in target.parameters()]
    ilql.polyak_update(target, source, 0.25)
    for t, b, s in zip(target.parameters(), before, source.parameters()):
        assert torch.allclose(t, 0.25 * s + 0.75 * b)
        assert not t.requires_grad or t.grad is None
    ilql.polyak_update(target, source, 1.0)
    assert all(torch.equal(t, s) for t, s in zip(target.parameters(), source.parameters()))


def _tiny_ilql(seed=0, vocab=48):
    torch.manual_seed(seed)
    lm = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=vocab,
            n_positions=32,
            n_embd=16,
            n_layer=1,
            n_head=2,
            eos_token_id=1,
            pad_token_id=0,
            bos_token_id=2,
        )
    ).eval()
    model = ilql.ILQLModel(lm).eval()
    return model, ilql.ILQLModel(lm).q_heads  # other random heads as the target


def test_logits_processor_reads_the_state_the_heads_are_trained_on():
    model, target = _tiny_ilql()
    ids = torch.randint(3, 48, (2, 6))
    mask, pos = torch.ones_like(ids), torch.arange(6).expand(2, -1)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, actions=ids[:, 1:])  # states at all 6
        logits = model.lm(input_ids=ids, attention_mask=mask).logits
        with ilql.ILQLLogitsProcessor(model, target, beta=2.0) as processor:
            model.lm(input_ids=ids, attention_mask=mask)  # the hook keeps the last position's hidden state
            shifted = processor(ids, logits[:, -1])
        target_q = torch.stack([q(out.hidden[:, -1]) for q in target]).min(0).values
    expected = torch.log_softmax(logits[:, -1], -1) + 2.0 * (target_q - out.values[:, -1:])
    assert torch.allclose(shifted, expected, atol=1e-5)


@pytest.mark.parametrize("chunk", [0, 2])
def test_heads_run_on_the_response_states_only_and_match_a_full_forward(chunk):
    """The LM head and the vocabulary-wide Q heads see the states s_0..s_T of the response (its last T + 1
    positions; s_T needs V only) and nothing of the prompt, in one pass or in chunks of positions; what they return
    equals the same positions of a forward over every position, read at the response's tokens."""
    model, _ = _tiny_ilql()
    seen = {"lm_head": [], "q": [], "v": []}
    model.lm.lm_head.register_forward_hook(lambda m, inputs, out: seen["lm_head"].append(inputs[0].shape[1]))
    model.q_heads[0].register_forward_hook(lambda m, inputs, out: seen["q"].append(inputs[0].shape[1]))
    model.v_head.register_forward_hook(lambda m, inputs, out: seen["v"].append(inputs[0].shape[1]))
    ids = torch.randint(3, 48, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded prompt
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    actions = ids[:, -3:]  # a response of T = 3 tokens: states s_0..s_3 at the last 4 positions
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, actions=actions, chunk=chunk)
        heads = [4] if chunk == 0 else [2, 1]  # one pass: s_0..s_3 (LM logits at s_3 unread); chunks: s_0..s_2
        assert seen == {"lm_head": heads, "q": heads, "v": [4]}
        full = model.lm(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
        hidden = full.hidden_states[-1][:, -4:]
        q_logits = torch.stack([q(hidden[:, :-1]) for q in model.q_heads])
        values = model.v_head(hidden).squeeze(-1)
    assert out.q.shape == (2, 3, 3) and out.logprobs.shape == (3, 3) and out.values.shape == (3, 4)
    assert torch.allclose(out.hidden, hidden, atol=1e-6)
    assert torch.allclose(out.values, values, atol=1e-6)
    taken = actions[..., None]
    logprobs = torch.log_softmax(full.logits[:, -4:-1], -1).gather(-1, taken).squeeze(-1)
    assert torch.allclose(out.logprobs, logprobs, atol=1e-5)
    q = q_logits.gather(-1, taken.expand(2, -1, -1, -1)).squeeze(-1)
    assert torch.allclose(out.q, q, atol=1e-5)
    assert torch.allclose(out.q_cross_entropy, torch.logsumexp(q_logits, -1) - q, atol=1e-5)


def test_beta_zero_leaves_sampling_unchanged_and_beta_changes_it():
    model, target = _tiny_ilql()
    query = torch.randint(3, 48, (4, 5))
    query_mask = torch.ones_like(query)
    config = GenerationConfig(
        do_sample=True, top_k=20, temperature=1.0, max_new_tokens=12, pad_token_id=0, eos_token_id=1
    )

    def sample(beta):
        torch.manual_seed(7)
        if beta is None:  # plain transformers sampling, no processor
            return model.lm.generate(input_ids=query, attention_mask=query_mask, generation_config=config)[:, 5:]
        return ilql.generate(
            model, target, query_ids=query, query_mask=query_mask, generation_config=config, beta=beta, zero3=False
        )

    plain = sample(None)
    assert torch.equal(sample(0.0), plain)
    assert not torch.equal(sample(50.0), plain)
    assert not model.lm.get_output_embeddings()._forward_hooks, "the hook must be removed after generate"


def test_hh_1b_preset_is_what_launch_sh_passed():
    """The values `launch.sh paper ilql-hh --size 1b` passed as flags before the presets (its GPU layout,
    --reward-device cuda:1, stays in launch.sh), with the released prompt length 1000 − 128 tokens, not 896."""
    args = dataclasses.replace(ilql.Args(), **ilql.PRESETS["hh-1b"])
    expected = dict(
        model_name_or_path="Dahoas/pythia-1B-static-sft",
        dataset="Dahoas/rm-static",
        eval_split="test",
        eval_prompts=280,
        max_prompt_length=872,
        max_new_tokens=128,
        stop_strings=["Human:", "Assistant:"],
        unfrozen_layers=2,
        adam_betas=(0.9, 0.95),
        weight_decay=1e-6,
        bf16=True,
        offline_dataset="Dahoas/rm-static",
        reward_model=["Dahoas/gptj-rm-static"],
        tau=0.6,
        gamma=0.99,
        cql_scale=0.1,
        awac_scale=1.0,
        alpha=1e-4,
        beta_train=0.0,
        steps_for_target_q_sync=1,
        learning_rate=1e-6,
        eval_betas=[1.0, 4.0],
        top_k=20,
    )
    assert {k: getattr(args, k) for k in expected} == expected
    assert ilql.PRESETS["hh-125m"]["model_name_or_path"] == "Dahoas/pythia-125M-static-sft"
    assert ilql.PRESETS["hh-6b"]["model_name_or_path"] == "Dahoas/pythia-6B-static-sft"
    # the flags launch.sh did not pass keep the script's defaults
    assert (args.offline_epochs, args.mini_batch_size, args.reward_device) == (10, 16, "policy")
