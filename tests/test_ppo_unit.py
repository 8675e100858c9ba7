"""Unit tests of ppo.py's math (ALGORITHMS.md §1-§3): GAE against a plain loop, the clipped PPO loss on a hand-built
case, the adaptive KL controller, the reward-model read-out and the running score moments. CPU, offline, fast."""
import math

import pytest
import torch

import ppo


# ------------------------------------------------------------------------------------------------------------
# GAE
# ------------------------------------------------------------------------------------------------------------
def loop_gae(rewards, values, lengths, gamma, lam, width):
    """Plain Python GAE per row over its real tokens only; V after the last real token is 0."""
    advantages, returns = [], []
    for r, v, n in zip(rewards, values, lengths):
        a, gae, next_v = [0.0] * width, 0.0, 0.0
        for t in reversed(range(n)):
            delta = r[t] + gamma * next_v - v[t]
            gae = delta + gamma * lam * gae
            a[t] = gae
            next_v = v[t]
        advantages.append(a)
        returns.append([a[t] + v[t] if t < n else 0.0 for t in range(width)])
    return advantages, returns


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 0.0), (1.0, 1.0), (0.5, 1.0)])
def test_compute_gae_matches_python_loop(gamma, lam):
    g = torch.Generator().manual_seed(int(gamma * 100 + lam * 10))
    lengths, width = [7, 3, 1, 5, 0], 7
    rewards = torch.randn(len(lengths), width, generator=g, dtype=torch.float64)
    values = torch.randn(len(lengths), width, generator=g, dtype=torch.float64)
    mask = torch.zeros(len(lengths), width, dtype=torch.float64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    exp_adv, exp_ret = loop_gae(rewards.tolist(), values.tolist(), lengths, gamma, lam, width)
    # garbage on padding must not leak into the real tokens
    rewards_g = torch.where(mask.bool(), rewards, torch.full_like(rewards, 1e3))
    values_g = torch.where(mask.bool(), values, torch.full_like(values, -1e3))
    advantages, returns = ppo.compute_gae(rewards_g, values_g, mask, gamma, lam)
    for i in range(len(lengths)):
        assert advantages[i].tolist() == pytest.approx(exp_adv[i], abs=1e-10)
        assert returns[i].tolist() == pytest.approx(exp_ret[i], abs=1e-10)
    assert advantages[~mask.bool()].abs().sum().item() == 0.0
    assert returns[~mask.bool()].abs().sum().item() == 0.0


def test_compute_gae_hand_values():
    # γ = λ = 1: A_t = Σ_{k>=t} r_k − V_t.  rewards [0, 0, 1], values [0.5, 0.25, 0.125]
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.25, 0.125, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = ppo.compute_gae(rewards, values, mask, 1.0, 1.0)
    assert adv[0].tolist() == pytest.approx([0.5, 0.75, 0.875, 0.0])
    assert ret[0].tolist() == pytest.approx([1.0, 1.0, 1.0, 0.0])
    # γ = 0.5, λ = 0: A_t = δ_t = r_t + 0.5 V_{t+1} − V_t, V after the last token = 0
    adv, ret = ppo.compute_gae(rewards, values, mask, 0.5, 0.0)
    assert adv[0].tolist() == pytest.approx([0 + 0.125 - 0.5, 0 + 0.0625 - 0.25, 1 + 0 - 0.125, 0.0])
    assert ret[0].tolist() == pytest.approx([0.125, 0.0625, 1.0, 0.0])


# ------------------------------------------------------------------------------------------------------------
# PPO loss on a hand-built case
# ------------------------------------------------------------------------------------------------------------
EPS, EPS_V, VF_COEF = 0.2, 0.2, 0.5
# per token: (ratio, advantage, value, old value, return); row 1 has one padding token with garbage
ROW0 = [(1.5, 1.0, 1.5, 1.0, 2.0),     # ratio > 1+ε, A > 0: policy clip binds. V moved +0.5 away: value clip binds
        (0.5, -2.0, 0.125, 0.0, 1.0),  # ratio < 1−ε, A < 0: policy clip binds. V within ε_v: no value clip
        (1.1, 0.5, 0.0, 0.5, -1.0)]    # ratio inside: unclipped. V moved −0.5 toward R, overshoot: clip binds
ROW1 = [(1.5, -1.0, 1.0, 0.0, 0.0),    # ratio > 1+ε but A < 0: the unclipped term is the max (pessimistic)
        (0.7, 3.0, 2.125, 2.0, 2.0),   # ratio < 1−ε but A > 0: unclipped again. V within ε_v
        (5.0, 100.0, 50.0, -50.0, 9.0)]  # padding
MASK = [[1, 1, 1], [1, 1, 0]]
POLICY_CLIPPED = [[True, True, False], [False, False, False]]
VALUE_CLIPPED = [[True, False, True], [False, False, False]]


def hand_case():
    g = torch.Generator().manual_seed(0)
    old_logprobs = -torch.rand(2, 3, generator=g, dtype=torch.float64) * 3
    rows = [ROW0, ROW1]
    col = lambda k: torch.tensor([[tok[k] for tok in row] for row in rows], dtype=torch.float64)
    ratio, adv, values, old_values, returns = (col(k) for k in range(5))
    logprobs = (old_logprobs + ratio.log()).requires_grad_(True)
    values = values.clone().requires_grad_(True)
    return logprobs, old_logprobs, values, old_values, adv, returns, torch.tensor(MASK, dtype=torch.float64)


def test_ppo_loss_hand_case():
    logprobs, old_logprobs, values, old_values, adv, returns, mask = hand_case()
    loss, stats = ppo.ppo_loss(logprobs, old_logprobs, values, old_values, adv, returns, mask, EPS, EPS_V, VF_COEF)

    # hand values of the per-token terms (see the comments on ROW0 / ROW1)
    # pg: max(−A·r, −A·clip(r)): −1.2 (clipped), 1.6 (clipped), −0.55, 1.5, −2.1
    pg_terms = [-1.2, 1.6, -0.55, 1.5, -2.1]
    # vf: max((V−R)², (clip(V)−R)²): (1.2−2)²=0.64, (0.125−1)²=0.765625, (0.3+1)²=1.69, (1−0)²=1, (0.125)²
    vf_terms = [0.64, 0.765625, 1.69, 1.0, 0.015625]
    pg_loss = sum(pg_terms) / 5
    vf_loss = 0.5 * sum(vf_terms) / 5
    assert pg_loss == pytest.approx(-0.15)

    # the same from a loop over the table with the formulas of ALGORITHMS.md §3
    loop_pg, loop_vf, loop_kl, n = 0.0, 0.0, 0.0, 0
    for row, m in zip([ROW0, ROW1], MASK):
        for (r, a, v, v_old, ret), mt in zip(row, m):
            if not mt:
                continue
            n += 1
            loop_pg += max(-a * r, -a * min(max(r, 1 - EPS), 1 + EPS))
            v_clip = v_old + min(max(v - v_old, -EPS_V), EPS_V)
            loop_vf += max((v - ret) ** 2, (v_clip - ret) ** 2)
            loop_kl += r - 1 - math.log(r)
    assert loop_pg / n == pytest.approx(pg_loss, abs=1e-12)
    assert 0.5 * loop_vf / n == pytest.approx(vf_loss, abs=1e-12)

    assert stats["pg_loss"].item() == pytest.approx(pg_loss, abs=1e-9)
    assert stats["vf_loss"].item() == pytest.approx(vf_loss, abs=1e-9)
    assert loss.item() == pytest.approx(pg_loss + VF_COEF * vf_loss, abs=1e-9)
    assert stats["policy/clipfrac"].item() == pytest.approx(2 / 5)
    assert stats["value/clipfrac"].item() == pytest.approx(2 / 5)
    assert stats["policy/approx_kl"].item() == pytest.approx(loop_kl / n, abs=1e-9)
    # pg_loss / vf_loss keep their graphs (two engines run their own backward); the rest is detached
    assert stats["pg_loss"].requires_grad and stats["vf_loss"].requires_grad
    assert not any(stats[k].requires_grad for k in ("policy/approx_kl", "policy/clipfrac", "value/clipfrac"))


def test_ppo_loss_gradients():
    logprobs, old_logprobs, values, old_values, adv, returns, mask = hand_case()
    loss, _ = ppo.ppo_loss(logprobs, old_logprobs, values, old_values, adv, returns, mask, EPS, EPS_V, VF_COEF)
    loss.backward()
    n = 5
    for b in range(2):
        for t in range(3):
            r, a, v, _, ret = [ROW0, ROW1][b][t]
            g_logp, g_v = logprobs.grad[b, t].item(), values.grad[b, t].item()
            if not MASK[b][t]:
                assert g_logp == 0.0 and g_v == 0.0
                continue
            # policy: zero where the clip binds, else d(−A·exp(logp − old))/dlogp / n = −A·ratio / n
            expected = 0.0 if POLICY_CLIPPED[b][t] else -a * r / n
            assert g_logp == pytest.approx(expected, abs=1e-9), (b, t)
            # value: zero where the value clip binds, else vf_coef · 0.5 · 2 (V − R) / n
            expected = 0.0 if VALUE_CLIPPED[b][t] else VF_COEF * (v - ret) / n
            assert g_v == pytest.approx(expected, abs=1e-9), (b, t)


def test_ppo_loss_identity_ratio_is_minus_mean_advantage():
    """At the first step of an epoch (π = π_old, V = V_old) pg_loss = −mean(A), nothing is clipped, approx KL = 0."""
    g = torch.Generator().manual_seed(1)
    lp = torch.randn(3, 4, generator=g)
    adv, vals, ret = (torch.randn(3, 4, generator=g) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.float32)
    _, stats = ppo.ppo_loss(lp, lp, vals, vals, adv, ret, mask, EPS, EPS_V, 1.0)
    sel = mask.bool()
    assert stats["pg_loss"].item() == pytest.approx(-adv[sel].mean().item(), abs=1e-6)
    assert stats["vf_loss"].item() == pytest.approx(0.5 * ((vals - ret)[sel] ** 2).mean().item(), abs=1e-6)
    assert stats["policy/clipfrac"].item() == 0.0 and stats["value/clipfrac"].item() == 0.0
    assert stats["policy/approx_kl"].item() == pytest.approx(0.0, abs=1e-7)


# ------------------------------------------------------------------------------------------------------------
# Adaptive KL controller
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kl, expected", [
    (600.0, 0.05 * (1 + 0.2 * 64 / 10000)),   # 100 × target: error clipped to +0.2
    (7.2, 0.05 * (1 + 0.2 * 64 / 10000)),     # exactly +0.2
    (6.6, 0.05 * (1 + 0.1 * 64 / 10000)),     # +0.1
    (6.0, 0.05),                              # on target: unchanged
    (5.4, 0.05 * (1 - 0.1 * 64 / 10000)),     # −0.1
    (0.0, 0.05 * (1 - 0.2 * 64 / 10000)),     # error clipped to −0.2
    (-3.0, 0.05 * (1 - 0.2 * 64 / 10000)),    # a negative k1 estimate: still −0.2
])
def test_update_kl_coef_hand_values(kl, expected):
    assert ppo.update_kl_coef(0.05, kl, 6.0, 10000, 64) == pytest.approx(expected, rel=1e-12)


def test_update_kl_coef_direction_and_compounding():
    assert ppo.update_kl_coef(1.0, 100.0, 1.0, 10, 5) == pytest.approx(1.1)   # 1 · (1 + 0.2 · 5/10)
    assert ppo.update_kl_coef(1.0, 0.01, 1.0, 10, 5) == pytest.approx(0.9)
    beta = 0.05
    for _ in range(3):
        new = ppo.update_kl_coef(beta, 12.0, 6.0, 1000, 100)
        assert new == pytest.approx(beta * 1.02) and new > beta
        beta = new
    assert beta == pytest.approx(0.05 * 1.02 ** 3)


# ------------------------------------------------------------------------------------------------------------
# Reward read-out (common.load_reward) and decoding (ppo.decode_responses)
# ------------------------------------------------------------------------------------------------------------
WORDS = "the movie was great awful and i loved it".split()


def word_tokenizer(words, padding_side="left"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>"] + list(words))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # the built-in task's tokenizer: whitespace pre-tokeniser, WordPiece decoder (words joined by spaces)
    core.pre_tokenizer, core.decoder = pre_tokenizers.WhitespaceSplit(), decoders.WordPiece(prefix="##",
                                                                                            cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   padding_side=padding_side, clean_up_tokenization_spaces=False)


def tiny_score_model(vocab_size, seed=0):
    from transformers import GPT2Config, GPT2ForSequenceClassification
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=2, num_labels=1,
                        pad_token_id=0, initializer_range=0.3)
    return GPT2ForSequenceClassification(config).eval()


@torch.no_grad()
def score_alone(model, ids):
    hidden = model.transformer(input_ids=torch.tensor([ids])).last_hidden_state
    return model.score(hidden)[0, -1, 0].item()


def policy_batch(tok):
    import common
    prompts = ["the movie", "i loved", "it was great and"]
    responses = ["was great <eos>", "it", "awful <eos>"]
    query_ids, query_mask = common.pad_left([tok.encode(p) for p in prompts], tok.pad_token_id)
    rows = [tok.encode(r) for r in responses]
    width = max(len(r) for r in rows)
    response_ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    response_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return prompts, responses, query_ids, query_mask, response_ids, response_mask


def saved(tmp_path, model, tok, name):
    """The reward model and its tokenizer as a folder: load_reward takes the path a real run would."""
    model.save_pretrained(tmp_path / name), tok.save_pretrained(tmp_path / name)
    return str(tmp_path / name)


def test_reward_model_with_the_policy_tokenizer_reads_the_last_real_token(tmp_path):
    import common
    tok = word_tokenizer(WORDS)
    model = tiny_score_model(len(tok))
    prompts, responses, q, qm, r, rm = policy_batch(tok)
    reward = common.load_reward(saved(tmp_path, model, tok, "rm"), tok)
    assert reward.same_vocabulary
    scores = reward(q, qm, r, rm)
    expected = [score_alone(model, tok.encode(p) + tok.encode(resp)) for p, resp in zip(prompts, responses)]
    assert scores.tolist() == pytest.approx(expected, abs=1e-5)
    assert max(expected) - min(expected) > 1e-2


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reward_model_in_half_precision_scores_like_float32(tmp_path, dtype):
    import common
    tok = word_tokenizer(WORDS)
    model = tiny_score_model(len(tok))
    _, _, q, qm, r, rm = policy_batch(tok)
    path = saved(tmp_path, model, tok, "rm")
    full = common.load_reward(path, tok)(q, qm, r, rm)
    half_reward = common.load_reward(path, tok, dtype=dtype)
    half = half_reward(q, qm, r, rm)
    assert half.dtype == torch.float32  # summed with other rewards in float32
    assert half.tolist() == pytest.approx(full.tolist(), abs=0.05) and not torch.equal(half, full)


def test_reward_model_with_another_tokenizer_sees_the_same_words(tmp_path):
    """A reward model with its own tokenizer must score the decoded (prompt + response) words. Fails when the
    decoded prompt and response are joined as `p + r` with no separator: decode() of a word-level / WordPiece-decoded
    tokenizer (the built-in task's kind; SentencePiece tokenizers behave alike, dropping the first token's leading
    space) gives 'the movie' and 'was great', so the reward model reads 'the moviewas great' and gets <unk>."""
    import common
    tok = word_tokenizer(WORDS)
    rm_tok = word_tokenizer(list(reversed(WORDS)), padding_side="right")  # same words, other ids
    assert rm_tok.get_vocab() != tok.get_vocab()
    model = tiny_score_model(len(rm_tok))
    prompts, responses, q, qm, r, rm = policy_batch(tok)
    reward = common.load_reward(saved(tmp_path, model, rm_tok, "rm"), tok)
    assert not reward.same_vocabulary
    scores = reward(q, qm, r, rm)
    expected = []
    for p, resp in zip(prompts, responses):
        words = [w for w in f"{p} {resp}".split() if w not in ("<eos>", "<pad>")]  # special tokens skipped
        expected.append(score_alone(model, rm_tok.convert_tokens_to_ids(words)))
    assert scores.tolist() == pytest.approx(expected, abs=1e-5)


def test_reward_function_gets_decoded_prompts_and_responses(tmp_path, monkeypatch):
    import common
    (tmp_path / "my_rewards.py").write_text(
        "CALLS = []\n"
        "def words(prompts, responses):\n"
        "    CALLS.append((prompts, responses))\n"
        "    return [len(r.split()) + 0.5 for r in responses]\n"
        "def wrong_length(prompts, responses):\n"
        "    return [0.0]\n")
    monkeypatch.chdir(tmp_path)  # the module is looked up in the working directory
    tok = word_tokenizer(WORDS)
    prompts, responses, q, qm, r, rm = policy_batch(tok)
    assert common.load_reward("my_rewards:words", tok)(q, qm, r, rm).tolist() == [2.5, 1.5, 1.5]
    import my_rewards
    # the responses as they continue their prompts (" was great" after "the movie"), special tokens skipped
    assert my_rewards.CALLS == [(prompts, [" was great", " it", " awful"])]
    with pytest.raises(SystemExit, match="returned 1 scores for 3 responses"):
        common.load_reward("my_rewards:wrong_length", tok)(q, qm, r, rm)
    with pytest.raises(SystemExit, match="cannot import the reward function 'my_rewards:nothing'.*module:function"):
        common.load_reward("my_rewards:nothing", tok)
    with pytest.raises(SystemExit, match="cannot import the reward function 'no_such_module:f'"):
        common.load_reward("no_such_module:f", tok)


def test_decode_responses_keeps_eos_and_drops_padding():
    tok = word_tokenizer(WORDS)
    _, _, _, _, r, rm = policy_batch(tok)
    assert ppo.decode_responses(tok, r, rm) == ["was great <eos>", "it", "awful <eos>"]


# ------------------------------------------------------------------------------------------------------------
# RunningMoments
# ------------------------------------------------------------------------------------------------------------
def test_running_moments_equal_population_moments_of_everything_seen():
    g = torch.Generator().manual_seed(3)
    chunks = [torch.randn(5, generator=g, dtype=torch.float64) * 2 + 3,
              torch.randn(17, generator=g, dtype=torch.float64) * 0.5 - 1,
              torch.tensor([7.0], dtype=torch.float64),
              torch.randn(4, 3, generator=g, dtype=torch.float64)]
    moments = ppo.RunningMoments()
    for i, chunk in enumerate(chunks):
        moments.update(chunk)
        seen = [v for c in chunks[: i + 1] for v in c.flatten().tolist()]
        mean = sum(seen) / len(seen)
        std = math.sqrt(sum((v - mean) ** 2 for v in seen) / len(seen))
        assert moments.mean == pytest.approx(mean, rel=1e-6, abs=1e-7)
        assert moments.std == pytest.approx(std, rel=1e-6)
        assert moments.count == pytest.approx(len(seen), rel=1e-6)


def test_running_moments_float32_scores_with_an_offset():
    """Scores arrive as float32 (the reward model's output). With an offset of 1000 and std 1 the running std
    must still be right to 0.1%; the population moments are computed here in float64 from the same float32 values.
    (Failed while RunningMoments.update summed x and x**2 in float32 and took var = E[x^2] - E[x]^2.)"""
    g = torch.Generator().manual_seed(0)
    chunks = [1000 + torch.randn(200, generator=g) for _ in range(3)]
    moments = ppo.RunningMoments()
    for chunk in chunks:
        moments.update(chunk)
    seen = [v for c in chunks for v in c.tolist()]  # exact float32 values as Python floats
    mean = sum(seen) / len(seen)
    std = math.sqrt(sum((v - mean) ** 2 for v in seen) / len(seen))
    assert moments.mean == pytest.approx(mean, rel=1e-6)
    assert moments.std == pytest.approx(std, rel=1e-3)
