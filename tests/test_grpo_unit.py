"""grpo.py's group advantages and clipped loss against loop-computed values on ragged masks, for every variant."""

import math
from typing import NamedTuple

import pytest
import torch

import common
import grpo

LENGTHS = [3, 1, 5, 2, 4, 5]  # ragged responses; 6 rows = 3 groups of 2 or 2 groups of 3


def ragged_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = len(LENGTHS)
    width = max(LENGTHS)
    mask = torch.tensor([[1.0] * n + [0.0] * (width - n) for n in LENGTHS])
    old = -torch.rand(batch, width, generator=g) * 2
    logprobs = old + 0.4 * torch.randn(batch, width, generator=g)  # ratios well outside [0.8, 1.2] for some tokens
    ref = old + 0.3 * torch.randn(batch, width, generator=g)
    advantages = torch.randn(batch, generator=g)
    return logprobs * mask, old * mask, ref * mask, advantages, mask


# ---------------------------------------------------------------------------------------------- group_advantages
@pytest.mark.parametrize("group_size", [2, 3])
@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_group_advantages_match_a_loop_over_groups(estimator, group_size):
    scores = torch.tensor([0.5, -1.0, 2.0, 2.0, 0.25, -3.0])
    got = grpo.group_advantages(scores=scores, group_size=group_size, estimator=estimator)
    values = scores.tolist()
    for start in range(0, len(values), group_size):
        group = values[start : start + group_size]
        mean = sum(group) / group_size
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (group_size - 1))  # unbiased
        for i, r in enumerate(group):
            if estimator == "grpo":
                want = (r - mean) / (std + 1e-6)
            elif estimator == "dr_grpo":
                want = r - mean
            else:
                others = [x for j, x in enumerate(group) if j != i]
                want = r - sum(others) / len(others)
            assert got[start + i].item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_group_advantages_by_hand():
    scores = torch.tensor([1.0, 3.0, 0.0, 0.0])
    # group 1: mean 2, unbiased std √2; group 2: all equal, every advantage 0
    grpo_adv = grpo.group_advantages(scores=scores, group_size=2, estimator="grpo")
    assert grpo_adv.tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0, 0.0], rel=1e-5)
    # RLOO with G = 2: r_i − r_j = 2 (r_i − mean), twice Dr. GRPO's
    rloo = grpo.group_advantages(scores=scores, group_size=2, estimator="rloo")
    assert rloo.tolist() == pytest.approx([-2.0, 2.0, 0.0, 0.0])
    # RLOO is (G / (G − 1)) × Dr. GRPO's advantage for every G
    scores = torch.tensor([1.0, 4.0, -2.0, 0.5, 0.0, 3.0])
    dr = grpo.group_advantages(scores=scores, group_size=3, estimator="dr_grpo")
    rloo = grpo.group_advantages(scores=scores, group_size=3, estimator="rloo")
    torch.testing.assert_close(rloo, dr * 3 / 2)


def test_group_advantages_reject_bad_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        grpo.group_advantages(scores=torch.zeros(6), group_size=4, estimator="grpo")
    with pytest.raises(ValueError, match="groups of 1"):
        grpo.group_advantages(scores=torch.zeros(6), group_size=1, estimator="grpo")
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        grpo.group_advantages(scores=torch.zeros(6), group_size=2, estimator="gae")


# ---------------------------------------------------------------------------------------------- grpo_loss
def loop_loss(logprobs, old, ref, advantages, mask, *, low, high, aggregation, importance, max_tokens, kl_coef):
    """The loss, its KL term and its clip fractions, by Python loops over responses and tokens."""
    batch = len(LENGTHS)
    per_response = []
    all_tokens = []
    all_kl = []
    clipped = []
    for i in range(batch):
        n = LENGTHS[i]
        a = advantages[i].item()
        tokens = []
        kls = []
        log_ratios = []
        for t in range(n):
            log_ratio = logprobs[i, t].item() - old[i, t].item()
            log_ratios.append(log_ratio)
            rho = math.exp(log_ratio)
            tokens.append(-min(rho * a, min(max(rho, 1 - low), 1 + high) * a))
            clipped.append((rho < 1 - low and a < 0) or (rho > 1 + high and a > 0))
            d = ref[i, t].item() - logprobs[i, t].item()
            kls.append(math.exp(d) - d - 1)
        if importance == "sequence":
            s = math.exp(sum(log_ratios) / n)
            per_response.append(-min(s * a, min(max(s, 1 - low), 1 + high) * a))
        all_tokens.append(tokens)
        all_kl.append(kls)

    def reduce(rows):
        if aggregation == "sequence_mean":
            return sum(sum(r) / len(r) for r in rows) / batch
        if aggregation == "token_mean":
            return sum(sum(r) for r in rows) / sum(len(r) for r in rows)
        return sum(sum(r) for r in rows) / (batch * max_tokens)

    if importance == "sequence":
        policy = sum(per_response) / batch
        s_values = [
            math.exp(sum(logprobs[i, : LENGTHS[i]] - old[i, : LENGTHS[i]]).item() / LENGTHS[i]) for i in range(batch)
        ]
        a = advantages.tolist()
        clipped = [(s < 1 - low and x < 0) or (s > 1 + high and x > 0) for s, x in zip(s_values, a)]
    else:
        policy = reduce(all_tokens)
    kl = reduce(all_kl)
    return policy, kl, sum(clipped) / len(clipped)


VARIANTS = [
    dict(aggregation="sequence_mean", importance="token", low=0.2, high=0.2, kl_coef=0.04),
    dict(aggregation="token_mean", importance="token", low=0.2, high=0.28, kl_coef=0.0),
    dict(aggregation="constant", importance="token", low=0.1, high=0.3, kl_coef=0.1),
    dict(aggregation="sequence_mean", importance="sequence", low=0.05, high=0.05, kl_coef=0.04),
    dict(aggregation="token_mean", importance="sequence", low=0.02, high=0.04, kl_coef=0.0),
    dict(aggregation="constant", importance="sequence", low=0.05, high=0.1, kl_coef=0.2),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v['aggregation']}-{v['importance']}-kl{v['kl_coef']}")
def test_grpo_loss_matches_loops_on_ragged_masks(variant):
    logprobs, old, ref, advantages, mask = ragged_inputs()
    max_tokens = 7
    with_ref = variant["kl_coef"] > 0
    terms = grpo.grpo_loss(
        logprobs=logprobs,
        old_logprobs=old,
        advantages=advantages,
        response_mask=mask,
        cliprange_low=variant["low"],
        cliprange_high=variant["high"],
        aggregation=variant["aggregation"],
        importance=variant["importance"],
        max_tokens=max_tokens,
        ref_logprobs=ref if with_ref else None,
        kl_coef=variant["kl_coef"],
    )
    policy, kl, clipfrac = loop_loss(logprobs, old, ref, advantages, mask, max_tokens=max_tokens, **variant)
    assert terms.policy_loss.item() == pytest.approx(policy, rel=1e-5, abs=1e-6)
    assert terms.clipfrac.item() == pytest.approx(clipfrac, abs=1e-6)
    assert terms.clipfrac.item() == pytest.approx(terms.clipfrac_low.item() + terms.clipfrac_high.item())
    if with_ref:
        assert terms.kl_loss.item() == pytest.approx(kl, rel=1e-5)
        assert terms.loss.item() == pytest.approx(policy + variant["kl_coef"] * kl, rel=1e-5, abs=1e-6)
    else:
        assert terms.kl_loss is None
        assert terms.loss.item() == pytest.approx(policy, rel=1e-5, abs=1e-6)
    assert 0 < terms.clipfrac.item() < 1 or variant["importance"] == "sequence"  # the clip binds somewhere


def test_padding_does_not_change_the_loss():
    logprobs, old, ref, advantages, mask = ragged_inputs()
    noise = torch.randn_like(logprobs) * (1 - mask) * 5
    for importance in ("token", "sequence"):
        for aggregation in ("sequence_mean", "token_mean", "constant"):
            kwargs = dict(
                old_logprobs=old,
                advantages=advantages,
                response_mask=mask,
                cliprange_low=0.2,
                cliprange_high=0.28,
                aggregation=aggregation,
                importance=importance,
                max_tokens=5,
                ref_logprobs=ref,
                kl_coef=0.1,
            )
            clean = grpo.grpo_loss(logprobs=logprobs, **kwargs)
            padded = grpo.grpo_loss(logprobs=logprobs + noise, **kwargs)
            torch.testing.assert_close(clean.loss, padded.loss)


def test_on_policy_gradient_is_the_advantage_weighted_score_function():
    """With π_θ = π_old (one epoch, one step) the ratio is 1, the clip never binds, and the gradient of the token-level
    loss with `sequence_mean` is −1/B Σ_i Â_i / |y_i| Σ_t ∇ log π(y_t)."""
    _, old, _, advantages, mask = ragged_inputs()
    logprobs = old.clone().requires_grad_(True)
    terms = grpo.grpo_loss(
        logprobs=logprobs,
        old_logprobs=old,
        advantages=advantages,
        response_mask=mask,
        cliprange_low=0.2,
        cliprange_high=0.2,
        aggregation="sequence_mean",
    )
    terms.loss.backward()
    lengths = mask.sum(1, keepdim=True)
    want = -advantages[:, None] / lengths / len(LENGTHS) * mask
    torch.testing.assert_close(logprobs.grad, want)
    assert terms.clipfrac.item() == 0
    assert terms.approx_kl.item() == 0


def test_grpo_loss_rejects_unknown_names():
    logprobs, old, _, advantages, mask = ragged_inputs()
    kwargs = dict(logprobs=logprobs, old_logprobs=old, advantages=advantages, response_mask=mask)
    with pytest.raises(ValueError, match="unknown aggregation"):
        grpo.grpo_loss(**kwargs, cliprange_low=0.2, cliprange_high=0.2, aggregation="sum")
    with pytest.raises(ValueError, match="unknown importance"):
        grpo.grpo_loss(**kwargs, cliprange_low=0.2, cliprange_high=0.2, aggregation="token_mean", importance="x")
    with pytest.raises(ValueError, match="needs max_tokens"):
        grpo.grpo_loss(**kwargs, cliprange_low=0.2, cliprange_high=0.2, aggregation="constant")


def test_overlong_penalty_by_hand():
    """DAPO's soft overlong punishment with L_max = 12, L_cache = 4: 0 up to 8 tokens, then −1/4 per token, −1 at 12
    and beyond."""
    lengths = torch.tensor([1.0, 8.0, 9.0, 10.0, 12.0, 14.0])
    got = grpo.overlong_penalty(lengths=lengths, max_tokens=12, buffer=4)
    assert got.tolist() == pytest.approx([0.0, 0.0, -0.25, -0.5, -1.0, -1.0])


# ---------------------------------------------------------------------------------------------- groups without signal
@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_a_group_of_equal_scores_has_advantages_exactly_zero(estimator):
    """The float mean of 16 scores of 0.7 misses 0.7 by an ulp; divided by std + ε that would be an advantage of about
    0.06 on every response of a group that carries no signal."""
    scores = torch.cat([torch.full((16,), 0.7), torch.arange(16.0)])
    advantages = grpo.group_advantages(scores=scores, group_size=16, estimator=estimator)
    assert advantages[:16].tolist() == [0.0] * 16
    assert advantages[16:].abs().min() > 0
    assert grpo.signal_groups(scores, 16).tolist() == [False, True]


# ---------------------------------------------------------------------------------------------- dynamic sampling
G = 4


class FakeSampler:
    """A rollout without a model, as sample_groups calls it: prompt p's group has all-equal scores when p % 3 == 0
    (no signal), else the scores 0, 1, .., G − 1; prompt p is p + 1 tokens long, and the responses of a call are
    as long as the call's number (so that rounds differ in both widths). Log-probs are −p − position / 100."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *, prompt_rows, prompts):
        self.calls += 1
        ids = [int(text[1:]) for text in prompts]
        query_ids, query_mask = common.pad_left(prompt_rows, 0)
        width = self.calls
        rows = torch.arange(len(ids))
        prompt = torch.tensor(ids, dtype=torch.float)
        scores = torch.where(prompt % 3 == 0, 1.0, (rows % G).float())
        response_ids = (prompt[:, None] * 100 + rows[:, None] % G).long().expand(-1, width)
        logprobs = -prompt[:, None] - (rows[:, None] % G) / 100 + torch.zeros(1, width)
        batch = common.Batch(query_ids, query_mask, response_ids, torch.ones(len(ids), width))
        return common.Rollout(batch, scores, torch.ones(len(ids), dtype=torch.bool), logprobs, 2 * logprobs)


PROMPTS = [f"p{i}" for i in range(30)]
PROMPT_ROWS = [[i + 1] * (i + 1) for i in range(30)]  # prompt i: i + 1 tokens of id i + 1


def _sample_groups(seed, *, dynamic, max_rounds, num_prompts=4):
    sampler = torch.Generator().manual_seed(seed)
    fake = FakeSampler()
    groups = grpo.sample_groups(
        fake,
        prompt_rows=PROMPT_ROWS,
        prompts=PROMPTS,
        sampler=sampler,
        num_prompts=num_prompts,
        group_size=G,
        dynamic=dynamic,
        max_rounds=max_rounds,
        pad_id=0,
    )
    return groups, sampler, fake


def _draws(seed, rounds, num_prompts=4):
    """The prompts drawn by `rounds` rounds, and the generator's state after them."""
    sampler = torch.Generator().manual_seed(seed)
    drawn = [torch.randint(len(PROMPTS), (num_prompts,), generator=sampler).tolist() for _ in range(rounds)]
    return drawn, sampler.get_state()


def _check_rows(rollout):
    """Every row is its prompt's, left-padded prompt, right-padded response with its log-probs, in groups of G."""
    batch = rollout.batch
    for row in range(batch.query_ids.shape[0]):
        p = int(batch.response_ids[row, 0]) // 100
        n_query = int(batch.query_mask[row].sum())
        assert n_query == p + 1 and batch.query_ids[row, -n_query:].tolist() == [p + 1] * (p + 1)
        assert batch.query_ids[row, :-n_query].tolist() == [0] * (batch.query_ids.shape[1] - n_query)
        n_response = int(batch.response_mask[row].sum())
        assert batch.response_mask[row].tolist() == [1.0] * n_response + [0.0] * (
            batch.response_mask.shape[1] - n_response
        )
        assert rollout.old_logprobs[row, :n_response].tolist() == pytest.approx([-p - (row % G) / 100] * n_response)
        torch.testing.assert_close(rollout.ref_logprobs[row], 2 * rollout.old_logprobs[row])
        assert int(batch.response_ids[row, 0]) % 100 == row % G  # the group's rows in their order
    prompts = (batch.response_ids[:, 0] // 100).view(-1, G)
    assert (prompts == prompts[:, :1]).all()  # a group is one prompt's


def test_without_dynamic_sampling_one_round_draws_the_prompts_as_before():
    groups, sampler, fake = _sample_groups(0, dynamic=False, max_rounds=10)
    drawn, state = _draws(0, 1)
    assert (groups.rounds, groups.dropped, groups.filled, fake.calls) == (1, 0, 0, 1)
    assert (groups.rollout.batch.response_ids[::G, 0] // 100).tolist() == drawn[0]
    assert torch.equal(sampler.get_state(), state)


@pytest.mark.parametrize("seed", range(4))
def test_dynamic_sampling_keeps_the_first_groups_with_a_signal(seed):
    """The result against a loop over the same draws: the first groups whose prompt has a signal (p % 3 != 0), in the
    order drawn, until 4 are kept; the rounds and the dropped groups counted; the generator left as after that many
    draws (so a resumed run draws the same prompts next)."""
    groups, sampler, fake = _sample_groups(seed, dynamic=True, max_rounds=10)
    drawn, state = _draws(seed, groups.rounds)
    flat = [p for round_ in drawn for p in round_]
    with_signal = [p for p in flat if p % 3]
    assert len(with_signal[:4]) == 4 and len([p for p in flat[: -len(drawn[-1])] if p % 3]) < 4  # no round too many
    assert (groups.rollout.batch.response_ids[::G, 0] // 100).tolist() == with_signal[:4]
    assert groups.dropped == sum(p % 3 == 0 for p in flat)
    assert groups.filled == 0 and fake.calls == groups.rounds
    assert grpo.signal_groups(groups.rollout.scores, G).all()
    assert torch.equal(sampler.get_state(), state)
    _check_rows(groups.rollout)


def test_dynamic_sampling_fills_the_batch_with_dropped_groups_when_the_rounds_run_out():
    """Two rounds of 8 prompts cannot hold 8 groups with a signal for this seed: the batch is topped up with the
    groups dropped, in the order drawn, whose advantages are exactly 0."""
    seed = next(s for s in range(100) if sum(p % 3 != 0 for r in _draws(s, 2, 8)[0] for p in r) < 8)
    groups, sampler, _ = _sample_groups(seed, dynamic=True, max_rounds=2, num_prompts=8)
    drawn, state = _draws(seed, 2, 8)
    flat = [p for round_ in drawn for p in round_]
    with_signal = [p for p in flat if p % 3]
    without = [p for p in flat if p % 3 == 0]
    assert groups.rounds == 2 and groups.filled == 8 - len(with_signal) > 0
    assert groups.dropped == len(without)
    assert (groups.rollout.batch.response_ids[::G, 0] // 100).tolist() == with_signal + without[: groups.filled]
    advantages = grpo.group_advantages(scores=groups.rollout.scores, group_size=G, estimator="grpo")
    assert advantages[-groups.filled * G :].tolist() == [0.0] * groups.filled * G
    assert torch.equal(sampler.get_state(), state)
    _check_rows(groups.rollout)


# ---------------------------------------------------------------------------------------------- presets
class Published(NamedTuple):
    """One published setting: `python grpo.py --preset PRESET` must parse `field` to `value`; `source` is the paper's
    section or the released run's line (at a pinned commit) that sets it."""

    preset: str
    field: str
    value: object
    source: str


DSM = "Shao et al. 2024, DeepSeekMath (arXiv 2402.03300)"
DR_GRPO = "https://github.com/sail-sg/understand-r1-zero/blob/dfca49dd460ee7cc8e4a5a162c876a7fd6993b87"
DR_RUN = f"{DR_GRPO}/examples/qwen2.5-math-1.5b.sh"
DR_CODE = f"{DR_GRPO}/train_zero_math.py"
DAPO_RUN = (
    "https://github.com/volcengine/verl/blob/246cac4ca6b0e3ce1009bc48aaa798689e0600af/recipe/dapo/"
    "run_dapo_qwen2.5_32b.sh"
)
RLOO = "Ahmadian et al. 2024, Back to Basics (arXiv 2402.14740)"
GSPO = "Zheng et al. 2025, GSPO (arXiv 2507.18071)"
PUBLISHED = [
    Published("grpo", "advantage_estimator", "grpo", f"{DSM}, Section 4.1.2"),
    Published("grpo", "loss_aggregation", "sequence_mean", f"{DSM}, eq. (3)"),
    Published("grpo", "kl_coef", 0.04, f"{DSM}, Section 4.2"),
    Published("grpo", "kl_in_reward", False, f"{DSM}, eq. (3): β · eq. (4) in the objective"),
    Published("grpo", "group_size", 64, f"{DSM}, Section 4.2"),
    Published("grpo", "learning_rate", 1e-6, f"{DSM}, Section 4.2"),
    Published("grpo", "update_epochs", 1, f"{DSM}, Section 4.2 (a single update per exploration stage)"),
    Published("dr-grpo", "advantage_estimator", "dr_grpo", f"{DR_RUN}#L20, {DR_CODE}#L293-L300"),
    Published("dr-grpo", "loss_aggregation", "constant", f"{DR_RUN}#L20, {DR_CODE}#L286-L291"),
    Published("dr-grpo", "kl_coef", 0.0, f"{DR_RUN}#L33"),
    Published("dr-grpo", "group_size", 8, f"{DR_RUN}#L16, {DR_RUN}#L47"),
    Published("dr-grpo", "learning_rate", 1e-6, f"{DR_RUN}#L30"),
    Published("dr-grpo", "lr_schedule", "constant", f"{DR_RUN}#L31"),
    Published("dr-grpo", "update_epochs", 1, f"{DR_RUN}#L32"),
    Published("dr-grpo", "temperature", 1.0, f"{DR_RUN}#L48"),
    Published("dr-grpo", "top_p", 1.0, f"{DR_RUN}#L49"),
    Published("dapo", "advantage_estimator", "grpo", f"{DAPO_RUN}#L7"),
    Published("dapo", "kl_coef", 0.0, f"{DAPO_RUN}#L9-L12"),
    Published("dapo", "kl_in_reward", False, f"{DAPO_RUN}#L9"),
    Published("dapo", "cliprange_low", 0.2, f"{DAPO_RUN}#L14"),
    Published("dapo", "cliprange_high", 0.28, f"{DAPO_RUN}#L15"),
    Published("dapo", "loss_aggregation", "token_mean", f"{DAPO_RUN}#L23"),
    Published("dapo", "dynamic_sampling", True, f"{DAPO_RUN}#L25"),
    Published("dapo", "max_sampling_rounds", 10, f"{DAPO_RUN}#L27"),
    Published("dapo", "group_size", 16, f"{DAPO_RUN}#L30"),
    Published("dapo", "temperature", 1.0, f"{DAPO_RUN}#L46"),
    Published("dapo", "top_p", 1.0, f"{DAPO_RUN}#L47"),
    Published("dapo", "learning_rate", 1e-6, f"{DAPO_RUN}#L91"),
    Published("dapo", "lr_warmup_steps", 10, f"{DAPO_RUN}#L92"),
    Published("dapo", "weight_decay", 0.1, f"{DAPO_RUN}#L93"),
    Published("dapo", "max_grad_norm", 1.0, f"{DAPO_RUN}#L98"),
    Published("rloo", "advantage_estimator", "rloo", f"{RLOO}, the leave-one-out baseline"),
    Published("rloo", "kl_in_reward", True, f"{RLOO}, the KL penalty in the sequence reward"),
    Published("rloo", "group_size", 4, f"{RLOO}, RLOO with k = 4"),
    Published("gspo", "advantage_estimator", "grpo", f"{GSPO}, the group-normalised advantage"),
    Published("gspo", "importance", "sequence", f"{GSPO}, eq. (5)"),
    Published("gspo", "cliprange_low", 3e-4, f"{GSPO}, Section 5.1"),
    Published("gspo", "cliprange_high", 4e-4, f"{GSPO}, Section 5.1"),
    Published("gspo", "kl_coef", 0.0, f"{GSPO}, eq. (5) (no KL term)"),
]


class Scaled(NamedTuple):
    """A published setting that is a property of scale: the preset keeps a value that runs on the built-in task, and
    the published number of gradient steps per rollout batch (`steps`, rollout / mini-batch)."""

    preset: str
    published: dict  # the published fields, as this script names them
    steps: int  # gradient steps per rollout batch in the published run
    source: str


SCALED = [
    Scaled("grpo", dict(rollout_batch_size=1024, max_new_tokens=1024), 1, f"{DSM}, Section 4.2"),
    Scaled("dr-grpo", dict(rollout_batch_size=128 * 8, max_new_tokens=3000), 8, f"{DR_RUN}#L50-L55"),
    Scaled(
        "dapo",
        dict(rollout_batch_size=512 * 16, max_new_tokens=20 * 1024, overlong_buffer=4 * 1024),
        512 // 32,
        f"{DAPO_RUN}#L18-L31",
    ),
]


def _preset(name):
    return common.parse_args(grpo.Args, grpo.PRESETS, argv=["--preset", name])


@pytest.mark.parametrize("row", PUBLISHED, ids=lambda row: f"{row.preset}-{row.field}")
def test_each_preset_holds_the_published_value(row):
    value = getattr(_preset(row.preset), row.field)
    same = value == pytest.approx(row.value) if isinstance(row.value, float) else value == row.value
    assert same, f"grpo.py --preset {row.preset}: {row.field} {value!r}, published {row.value!r} ({row.source})"


@pytest.mark.parametrize("name", sorted(grpo.PRESETS))
def test_every_preset_field_is_published_or_a_runnable_scale(name):
    """Each field a preset sets is in the table of published values, or stands for a setting of scale (SCALED), where
    the preset runs on the built-in task with the published steps per rollout batch and overlong buffer share."""
    args = _preset(name)
    assert {key: getattr(args, key) for key in grpo.PRESETS[name]} == grpo.PRESETS[name]
    published = {row.field for row in PUBLISHED if row.preset == name}
    scaled = [row for row in SCALED if row.preset == name]
    sizes = {"rollout_batch_size", "mini_batch_size", "overlong_buffer"} if scaled else set()
    assert set(grpo.PRESETS[name]) - published <= sizes, name
    assert args.rollout_batch_size % args.group_size == 0 and args.rollout_batch_size % args.mini_batch_size == 0
    for row in scaled:
        assert args.rollout_batch_size // args.mini_batch_size == row.steps, row.source
        for field, value in row.published.items():
            assert getattr(args, field) < value, (field, row.source)  # the runnable value, not the published one
        if "overlong_buffer" in row.published:
            share = row.published["overlong_buffer"] / row.published["max_new_tokens"]
            assert args.overlong_buffer == round(share * args.max_new_tokens), row.source
