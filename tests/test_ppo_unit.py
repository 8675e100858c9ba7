"""Unit tests of ppo.py's math: GAE (PPO eq. (11), (12)) against a plain loop, the clipped PPO loss (PPO eq. (7) and the
clipped value loss) on a hand-built case, the adaptive KL controller (Ziegler et al. 2019, Section 2.2), the
reward-model read-out, the running score moments and the paper presets. CPU, offline, fast."""

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
    advantages, returns = ppo.compute_gae(
        rewards=rewards_g, values=values_g, response_mask=mask, gamma=gamma, gae_lambda=lam
    )
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
    adv, ret = ppo.compute_gae(rewards=rewards, values=values, response_mask=mask, gamma=1.0, gae_lambda=1.0)
    assert adv[0].tolist() == pytest.approx([0.5, 0.75, 0.875, 0.0])
    assert ret[0].tolist() == pytest.approx([1.0, 1.0, 1.0, 0.0])
    # γ = 0.5, λ = 0: A_t = δ_t = r_t + 0.5 V_{t+1} − V_t, V after the last token = 0
    adv, ret = ppo.compute_gae(rewards=rewards, values=values, response_mask=mask, gamma=0.5, gae_lambda=0.0)
    assert adv[0].tolist() == pytest.approx([0 + 0.125 - 0.5, 0 + 0.0625 - 0.25, 1 + 0 - 0.125, 0.0])
    assert ret[0].tolist() == pytest.approx([0.125, 0.0625, 1.0, 0.0])


# ------------------------------------------------------------------------------------------------------------
# PPO loss on a hand-built case
# ------------------------------------------------------------------------------------------------------------
EPS, EPS_V, VF_COEF = 0.2, 0.2, 0.5
# per token: (ratio, advantage, value, old value, return); row 1 has one padding token with garbage
ROW0 = [
    (1.5, 1.0, 1.5, 1.0, 2.0),  # ratio > 1+ε, A > 0: policy clip binds. V moved +0.5 away: value clip binds
    (0.5, -2.0, 0.125, 0.0, 1.0),  # ratio < 1−ε, A < 0: policy clip binds. V within ε_v: no value clip
    (1.1, 0.5, 0.0, 0.5, -1.0),
]  # ratio inside: unclipped. V moved −0.5 toward R, overshoot: clip binds
ROW1 = [
    (1.5, -1.0, 1.0, 0.0, 0.0),  # ratio > 1+ε but A < 0: the unclipped term is the max (pessimistic)
    (0.7, 3.0, 2.125, 2.0, 2.0),  # ratio < 1−ε but A > 0: unclipped again. V within ε_v
    (5.0, 100.0, 50.0, -50.0, 9.0),
]  # padding
MASK = [[1, 1, 1], [1, 1, 0]]
POLICY_CLIPPED = [[True, True, False], [False, False, False]]
VALUE_CLIPPED = [[True, False, True], [False, False, False]]


def hand_case():
    g = torch.Generator().manual_seed(0)
    old_logprobs = -torch.rand(2, 3, generator=g, dtype=torch.float64) * 3
    rows = [ROW0, ROW1]

    def col(k):
        return torch.tensor([[tok[k] for tok in row] for row in rows], dtype=torch.float64)

    ratio, adv, values, old_values, returns = (col(k) for k in range(5))
    logprobs = (old_logprobs + ratio.log()).requires_grad_(True)
    values = values.clone().requires_grad_(True)
    return logprobs, old_logprobs, values, old_values, adv, returns, torch.tensor(MASK, dtype=torch.float64)


def loss_of_hand_case(logprobs, old_logprobs, values, old_values, adv, returns, mask, vf_coef=VF_COEF):
    return ppo.ppo_loss(
        logprobs=logprobs,
        old_logprobs=old_logprobs,
        values=values,
        old_values=old_values,
        advantages=adv,
        returns=returns,
        response_mask=mask,
        cliprange=EPS,
        cliprange_value=EPS_V,
        vf_coef=vf_coef,
    )


def test_ppo_loss_hand_case():
    terms = loss_of_hand_case(*hand_case())

    # hand values of the per-token terms (see the comments on ROW0 / ROW1)
    # pg: max(−A·r, −A·clip(r)): −1.2 (clipped), 1.6 (clipped), −0.55, 1.5, −2.1
    pg_terms = [-1.2, 1.6, -0.55, 1.5, -2.1]
    # vf: max((V−R)², (clip(V)−R)²): (1.2−2)²=0.64, (0.125−1)²=0.765625, (0.3+1)²=1.69, (1−0)²=1, (0.125)²
    vf_terms = [0.64, 0.765625, 1.69, 1.0, 0.015625]
    pg_loss = sum(pg_terms) / 5
    vf_loss = 0.5 * sum(vf_terms) / 5
    assert pg_loss == pytest.approx(-0.15)

    # the same from a loop over the table: PPO eq. (7) and the clipped value loss, token by token
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

    assert terms.policy_loss.item() == pytest.approx(pg_loss, abs=1e-9)
    assert terms.value_loss.item() == pytest.approx(vf_loss, abs=1e-9)
    assert terms.loss.item() == pytest.approx(pg_loss + VF_COEF * vf_loss, abs=1e-9)
    assert terms.clipfrac.item() == pytest.approx(2 / 5)
    assert terms.value_clipfrac.item() == pytest.approx(2 / 5)
    assert terms.approx_kl.item() == pytest.approx(loop_kl / n, abs=1e-9)
    # the losses keep their graphs (two engines run their own backward); the statistics are detached
    assert terms.loss.requires_grad and terms.policy_loss.requires_grad and terms.value_loss.requires_grad
    assert not any(t.requires_grad for t in (terms.approx_kl, terms.clipfrac, terms.value_clipfrac))


def test_ppo_loss_gradients():
    logprobs, old_logprobs, values, old_values, adv, returns, mask = hand_case()
    terms = loss_of_hand_case(logprobs, old_logprobs, values, old_values, adv, returns, mask)
    terms.loss.backward()
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
    terms = loss_of_hand_case(lp, lp, vals, vals, adv, ret, mask, vf_coef=1.0)
    sel = mask.bool()
    assert terms.policy_loss.item() == pytest.approx(-adv[sel].mean().item(), abs=1e-6)
    assert terms.value_loss.item() == pytest.approx(0.5 * ((vals - ret)[sel] ** 2).mean().item(), abs=1e-6)
    assert terms.clipfrac.item() == 0.0 and terms.value_clipfrac.item() == 0.0
    assert terms.approx_kl.item() == pytest.approx(0.0, abs=1e-7)


# ------------------------------------------------------------------------------------------------------------
# Adaptive KL controller
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kl, expected",
    [
        (600.0, 0.05 * (1 + 0.2 * 64 / 10000)),  # 100 × target: error clipped to +0.2
        (7.2, 0.05 * (1 + 0.2 * 64 / 10000)),  # exactly +0.2
        (6.6, 0.05 * (1 + 0.1 * 64 / 10000)),  # +0.1
        (6.0, 0.05),  # on target: unchanged
        (5.4, 0.05 * (1 - 0.1 * 64 / 10000)),  # −0.1
        (0.0, 0.05 * (1 - 0.2 * 64 / 10000)),  # error clipped to −0.2
        (-3.0, 0.05 * (1 - 0.2 * 64 / 10000)),  # a negative k1 estimate: still −0.2
    ],
)
def test_update_kl_coef_hand_values(kl, expected):
    beta = ppo.update_kl_coef(kl_coef=0.05, current_kl=kl, target_kl=6.0, horizon=10000, n_steps=64)
    assert beta == pytest.approx(expected, rel=1e-12)


def test_update_kl_coef_direction_and_compounding():
    up = ppo.update_kl_coef(kl_coef=1.0, current_kl=100.0, target_kl=1.0, horizon=10, n_steps=5)
    down = ppo.update_kl_coef(kl_coef=1.0, current_kl=0.01, target_kl=1.0, horizon=10, n_steps=5)
    assert up == pytest.approx(1.1)  # 1 · (1 + 0.2 · 5/10)
    assert down == pytest.approx(0.9)
    beta = 0.05
    for _ in range(3):
        new = ppo.update_kl_coef(kl_coef=beta, current_kl=12.0, target_kl=6.0, horizon=1000, n_steps=100)
        assert new == pytest.approx(beta * 1.02) and new > beta
        beta = new
    assert beta == pytest.approx(0.05 * 1.02**3)


# ------------------------------------------------------------------------------------------------------------
# Reward read-out (common.load_reward) and decoding (common.decode_responses)
# ------------------------------------------------------------------------------------------------------------
WORDS = ["the", "movie", "was", "great", "awful", "and", "i", "loved", "it"]


def word_tokenizer(words, padding_side="left"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>"] + list(words))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # the built-in task's tokenizer: whitespace pre-tokeniser, WordPiece decoder (words joined by spaces)
    core.pre_tokenizer, core.decoder = pre_tokenizers.WhitespaceSplit(), decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side=padding_side,
        clean_up_tokenization_spaces=False,
    )


def tiny_score_model(vocab_size, seed=0):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        num_labels=1,
        pad_token_id=0,
        initializer_range=0.3,
    )
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
    return prompts, responses, common.Batch(query_ids, query_mask, response_ids, response_mask)


def saved(tmp_path, model, tok, name):
    """The reward model and its tokenizer as a folder: load_reward takes the path a real run would."""
    model.save_pretrained(tmp_path / name)
    tok.save_pretrained(tmp_path / name)
    return str(tmp_path / name)


def test_reward_model_with_the_policy_tokenizer_reads_the_last_real_token(tmp_path):
    import common

    tok = word_tokenizer(WORDS)
    model = tiny_score_model(len(tok))
    prompts, responses, batch = policy_batch(tok)
    reward = common.load_reward(saved(tmp_path, model, tok, "reward_model"), tok)
    assert reward.same_vocabulary
    scores = reward(*batch)
    expected = [score_alone(model, tok.encode(p) + tok.encode(resp)) for p, resp in zip(prompts, responses)]
    assert scores.tolist() == pytest.approx(expected, abs=1e-5)
    assert max(expected) - min(expected) > 1e-2


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reward_model_in_half_precision_scores_like_float32(tmp_path, dtype):
    import common

    tok = word_tokenizer(WORDS)
    model = tiny_score_model(len(tok))
    _, _, batch = policy_batch(tok)
    path = saved(tmp_path, model, tok, "reward_model")
    full = common.load_reward(path, tok)(*batch)
    half_reward = common.load_reward(path, tok, dtype=dtype)
    half = half_reward(*batch)
    assert half.dtype == torch.float32  # summed with other rewards in float32
    assert half.tolist() == pytest.approx(full.tolist(), abs=0.05) and not torch.equal(half, full)


def test_reward_model_with_another_tokenizer_sees_the_same_words(tmp_path):
    """A reward model with its own tokenizer must score the decoded (prompt + response) words. Fails when the
    decoded prompt and response are joined as `p + r` with no separator: decode() of a word-level / WordPiece-decoded
    tokenizer (the built-in task's kind; SentencePiece tokenizers behave alike, dropping the first token's leading
    space) gives 'the movie' and 'was great', so the reward model reads 'the moviewas great' and gets <unk>."""
    import common

    tok = word_tokenizer(WORDS)
    reward_tokenizer = word_tokenizer(list(reversed(WORDS)), padding_side="right")  # same words, other ids
    assert reward_tokenizer.get_vocab() != tok.get_vocab()
    model = tiny_score_model(len(reward_tokenizer))
    prompts, responses, batch = policy_batch(tok)
    reward = common.load_reward(saved(tmp_path, model, reward_tokenizer, "reward_model"), tok)
    assert not reward.same_vocabulary
    scores = reward(*batch)
    expected = []
    for p, resp in zip(prompts, responses):
        words = [w for w in f"{p} {resp}".split() if w not in ("<eos>", "<pad>")]  # special tokens skipped
        expected.append(score_alone(model, reward_tokenizer.convert_tokens_to_ids(words)))
    assert scores.tolist() == pytest.approx(expected, abs=1e-5)


def test_reward_function_gets_decoded_prompts_and_responses(tmp_path, monkeypatch):
    import common

    (tmp_path / "my_rewards.py").write_text(
        "CALLS = []\n"
        "def words(prompts, responses):\n"
        "    CALLS.append((prompts, responses))\n"
        "    return [len(r.split()) + 0.5 for r in responses]\n"
        "def wrong_length(prompts, responses):\n"
        "    return [0.0]\n"
    )
    monkeypatch.chdir(tmp_path)  # the module is looked up in the working directory
    tok = word_tokenizer(WORDS)
    prompts, _, batch = policy_batch(tok)
    assert common.load_reward("my_rewards:words", tok)(*batch).tolist() == [2.5, 1.5, 1.5]
    import my_rewards

    # the responses as they continue their prompts (" was great" after "the movie"), special tokens skipped
    calls = my_rewards.CALLS
    assert calls == [(prompts, [" was great", " it", " awful"])]
    with pytest.raises(SystemExit, match="returned 1 scores for 3 responses"):
        common.load_reward("my_rewards:wrong_length", tok)(*batch)
    with pytest.raises(SystemExit, match=r"cannot import the reward function 'my_rewards:nothing'.*module:function"):
        common.load_reward("my_rewards:nothing", tok)
    with pytest.raises(SystemExit, match="cannot import the reward function 'no_such_module:f'"):
        common.load_reward("no_such_module:f", tok)


def test_decode_responses_keeps_eos_and_drops_padding():
    import common

    tok = word_tokenizer(WORDS)
    _, _, batch = policy_batch(tok)
    assert common.decode_responses(tok, batch.response_ids, batch.response_mask) == [
        "was great <eos>",
        "it",
        "awful <eos>",
    ]


# ------------------------------------------------------------------------------------------------------------
# RunningMoments
# ------------------------------------------------------------------------------------------------------------
def test_running_moments_equal_population_moments_of_everything_seen():
    g = torch.Generator().manual_seed(3)
    chunks = [
        torch.randn(5, generator=g, dtype=torch.float64) * 2 + 3,
        torch.randn(17, generator=g, dtype=torch.float64) * 0.5 - 1,
        torch.tensor([7.0], dtype=torch.float64),
        torch.randn(4, 3, generator=g, dtype=torch.float64),
    ]
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
    must still be right to 0.1% (summing x and x² in float32 and taking E[x²] − E[x]² is not); the population
    moments are computed here in float64 from the same float32 values."""
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


# ------------------------------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------------------------------
def test_hh_1b_preset_equals_what_launch_sh_passed():
    """The values `./launch.sh paper ppo-hh --size 1b` passed to ppo.py before presets lived beside Args (the GPU
    layout aside: --ref-device, --value-device and --reward-device stay in launch.sh)."""
    import common

    args = common.parse_args(ppo.Args, ppo.PRESETS, argv=["--preset", "hh-1b"])
    expected = dict(
        model_name_or_path="Dahoas/pythia-1B-static-sft",
        dataset="Dahoas/rm-static",
        eval_split="test",
        eval_prompts=280,
        max_prompt_length=896,
        max_new_tokens=128,
        stop_strings=["Human:", "Assistant:"],
        unfrozen_layers=2,
        adam_betas=(0.9, 0.95),
        weight_decay=1e-6,
        bf16=True,
        reward_model=["Dahoas/gptj-rm-static"],
        value_model="policy",
        rollout_batch_size=64,
        mini_batch_size=8,
        update_epochs=2,
        gamma=1.0,
        gae_lambda=0.95,
        vf_coef=1.0,
        learning_rate=1e-6,
        init_kl_coef=0.05,
        adaptive_kl=True,
        target_kl=6.0,
        cliprange=0.2,
        cliprange_value=0.2,
        reward_scaling="running",
        reward_clip=10.0,
    )
    assert {k: getattr(args, k) for k in expected} == expected
    assert tuple(args.adam_betas) == (0.9, 0.95)
    assert (args.ref_device, args.value_device, args.reward_device) == ("policy", "policy", "policy")
    # the other sizes differ in the policy, 125m in its rollout batch (128) and both in the learning rate (8e-6)
    small = common.parse_args(ppo.Args, ppo.PRESETS, argv=["--preset", "hh-125m"])
    assert (small.model_name_or_path, small.rollout_batch_size, small.learning_rate) == (
        "Dahoas/pythia-125M-static-sft",
        128,
        8e-6,
    )
    large = common.parse_args(ppo.Args, ppo.PRESETS, argv=["--preset", "hh-6b", "--learning-rate", "1e-5"])
    assert (large.model_name_or_path, large.rollout_batch_size, large.learning_rate) == (
        "Dahoas/pythia-6B-static-sft",
        64,
        1e-5,  # a flag given wins over the preset
    )


def test_tldr_preset_equals_what_launch_sh_passed():
    """What `./launch.sh paper ppo-tldr` passed, with the released prompt length (550 − 50 tokens, not 512)."""
    import common

    args = common.parse_args(ppo.Args, ppo.PRESETS, argv=["--preset", "tldr"])
    expected = dict(
        model_name_or_path="CarperAI/openai_summarize_tldr_sft",
        reward_model=["CarperAI/openai_summarize_tldr_rm_checkpoint"],
        dataset="CarperAI/openai_summarize_tldr",
        eval_split="test",
        eval_prompts=280,
        max_prompt_length=500,
        max_new_tokens=50,
        unfrozen_layers=8,
        bf16=True,
        value_model="policy",
        rollout_batch_size=128,
        mini_batch_size=8,
        update_epochs=2,
        gamma=1.0,
        gae_lambda=0.95,
        learning_rate=1e-6,
        weight_decay=0.01,
        vf_coef=0.2,
        init_kl_coef=0.1,
        adaptive_kl=True,
        target_kl=6.0,
        cliprange=0.2,
        cliprange_value=0.2,
        reward_scaling="none",
        reward_clip=10.0,
    )
    assert {k: getattr(args, k) for k in expected} == expected
    assert tuple(args.adam_betas) == (0.9, 0.999)
