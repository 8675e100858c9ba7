"""Every script's paper presets (PRESETS beside its Args): each names only Args fields, `--preset NAME` gives those
values, and what a preset sets is consistent. What each preset holds is checked against the released settings in
the scripts' own unit tests."""

import dataclasses
import fnmatch
import functools
import importlib
from typing import NamedTuple

import pytest
import torch
from conftest import ROOT

import common

SIZES = ("hh-125m", "hh-1b", "hh-6b")
EXPECTED = {
    "ppo": {*SIZES, "tldr", "ppo-max"},
    "apa": {*SIZES, "tldr", "offline-hh-125m", "offline-hh-1b", "offline-hh-6b"},
    "awr": {*SIZES, "offline-hh-125m", "offline-hh-1b", "offline-hh-6b"},
    "ilql": set(SIZES),
    "alol": set(SIZES),
    "dpo": set(SIZES),
    "pro": set(SIZES),
    "grpo": {"grpo", "dr-grpo", "dapo", "rloo", "gspo"},  # their published values: tests/test_grpo_unit.py
}


@pytest.mark.parametrize("script", EXPECTED)
def test_every_preset_is_fields_of_args_that_parse_to_its_values(script):
    module = importlib.import_module(script)
    assert set(module.PRESETS) == EXPECTED[script]
    fields = {field.name for field in dataclasses.fields(module.Args)}
    for name, preset in module.PRESETS.items():
        assert set(preset) <= fields, (name, set(preset) - fields)
        built = dataclasses.replace(module.Args(), **preset)
        parsed = common.parse_args(module.Args, module.PRESETS, argv=["--preset", name])
        assert parsed.preset == name
        assert {key: getattr(parsed, key) for key in preset} == {key: getattr(built, key) for key in preset}, name
        if script in ("apa", "awr"):  # the offline presets, and only they, train on a dataset's rows
            assert (parsed.offline_dataset is not None) == name.startswith("offline-"), name
        if "rollout_batch_size" in preset or "mini_batch_size" in preset:
            assert getattr(parsed, "rollout_batch_size", 0) % parsed.mini_batch_size == 0, name


# ------------------------------------------------------------------------------------------------------------
# The released values, field by field: each preset against the run its values come from
# ------------------------------------------------------------------------------------------------------------
class Released(NamedTuple):
    """One value of a released run: `script`'s presets matching `presets` (fnmatch) must parse `field` to `value`;
    `source` is the line of the released code (at a pinned commit) that sets it."""

    script: str
    presets: str
    field: str
    value: object
    source: str


APA = "https://github.com/microsoft/RLHF-APA/blob/cfe7da20dbc6cf9753825a6acd9c3367fd22f7fa"
TRLX_CUT = f"{APA}/trlx/trlx.py#L86"  # trlX cuts prompts to seq_length − max_new_tokens
LOL = "https://github.com/abaheti95/LoL-RL/blob/9f8d81660bfa0bad17ae5d7835185987f028812e"
MOSS = "https://github.com/OpenLMLab/MOSS-RLHF/blob/4865d826fc6705dfdf1894aede00b4c81dabb24b"
# The A-LoL work's scripts build their optimiser with transformers' Trainer.get_optimizer_cls_and_kwargs (lr, betas,
# eps only) and bitsandbytes' AdamW, whose weight decay defaults to 0.01, at the versions their requirements pin; a
# "constant" schedule takes no warm-up there.
BNB_DECAY = (
    "https://github.com/huggingface/transformers/blob/v4.32.1/src/transformers/trainer.py#L1021-L1026 and "
    "https://github.com/bitsandbytes-foundation/bitsandbytes/blob/18e827d666fa2b70a12d539ccedc17aa51b2c97c/"
    "bitsandbytes/optim/adamw.py#L9-L12"
)
NO_WARMUP = "https://github.com/huggingface/transformers/blob/v4.32.1/src/transformers/optimization.py#L358-L359"

PPO_HH = f"{APA}/examples/ppo_hh.py"
PPO_TLDR = f"{APA}/examples/ppo_tldr.py"
APA_HH = f"{APA}/examples/apa_hh.py"  # also AWR's HH runs (LOSS = "log")
APA_TLDR = f"{APA}/examples/apa_tldr.py"
APA_OFF = f"{APA}/examples/apa_off_hh.py"
ILQL_HH = f"{APA}/examples/ilql_hh.py"
LOL_ALOL = f"{LOL}/lolrl_qlora_llama_hh.py"
LOL_DPO = f"{LOL}/dpo_qlora_llama_hh.py"
LOL_PRO = f"{LOL}/pro_qlora_llama_hh.py"


def trlx_hh(script: str, presets: str, source: str, lines: dict, seq_length: int = 1000) -> list:
    """What every trlX HH run of the APA repository sets alike: prompts cut to seq_length − 128 new tokens, AdamW
    (0.9, 0.95) with ε 1e-8 and weight decay 1e-6. `lines`: the lines of seq_length, max_new_tokens, the optimiser."""
    optimizer = f"{source}#L{lines['optimizer']}"
    return [
        Released(script, presets, "max_prompt_length", seq_length - 128, f"{source}#L{lines['seq']}, {TRLX_CUT}"),
        Released(script, presets, "max_new_tokens", 128, f"{source}#L{lines['new_tokens']}"),
        Released(script, presets, "adam_betas", (0.9, 0.95), optimizer),
        Released(script, presets, "adam_eps", 1e-8, optimizer),
        Released(script, presets, "weight_decay", 1e-6, optimizer),
    ]


def lol_hh(script: str, source: str, lines: dict) -> list:
    """What the A-LoL work's three HH scripts set alike (their line numbers differ)."""
    return [
        Released(script, "hh-*", "learning_rate", 2e-4, f"{source}#L{lines['lr']}"),
        Released(script, "hh-*", "adam_betas", (0.9, 0.999), f"{source}#L{lines['betas']}"),
        Released(script, "hh-*", "adam_eps", 1e-6, f"{source}#L{lines['eps']}"),
        Released(script, "hh-*", "weight_decay", 0.01, f"{source}#L{lines['optimizer']}, {BNB_DECAY}"),
        Released(script, "hh-*", "lr_schedule", "constant", f"{source}#L{lines['schedule']}"),
        Released(script, "hh-*", "lr_warmup_steps", 0, f"{source}#L{lines['scheduler']}, {NO_WARMUP}"),
        Released(script, "hh-*", "max_grad_norm", 0.3, f"{source}#L{lines['clip']}"),
        Released(script, "hh-*", "mini_batch_size", 16, f"{source}#L{lines['batch']} (per device × accumulation)"),
        Released(script, "hh-*", "total_steps", 9000, f"{source}#L{lines['steps']}"),
        Released(script, "hh-*", "max_prompt_length", 768 - 128, f"{source}#L{lines['prompt']}"),
        Released(script, "hh-*", "max_new_tokens", 128, f"{source}#L{lines['generate']}"),
    ]


RELEASED = [
    # ppo.py: the APA repository's PPO runs (examples/ppo_hh.py, ppo_tldr.py) and PPO-max (MOSS-RLHF)
    *trlx_hh("ppo", "hh-*", PPO_HH, dict(seq=37, new_tokens=70, optimizer=50), seq_length=1024),
    Released("ppo", "hh-125m", "learning_rate", 8e-6, f"{PPO_HH}#L50"),
    Released("ppo", "hh-1b", "learning_rate", 1e-6, f"{PPO_HH}#L90"),
    Released("ppo", "hh-6b", "learning_rate", 8e-6, f"{PPO_HH}#L50"),
    Released("ppo", "hh-125m", "model_name_or_path", "Dahoas/pythia-125M-static-sft", f"{PPO_HH}#L84"),
    Released("ppo", "hh-1b", "model_name_or_path", "Dahoas/pythia-1B-static-sft", f"{PPO_HH}#L92"),
    Released("ppo", "hh-6b", "model_name_or_path", "Dahoas/pythia-6B-static-sft", f"{PPO_HH}#L98"),
    Released("ppo", "hh-*", "unfrozen_layers", 2, f"{PPO_HH}#L48"),
    Released("ppo", "hh-125m", "rollout_batch_size", 128, f"{PPO_HH}#L86"),
    Released("ppo", "hh-[16]b", "rollout_batch_size", 64, f"{PPO_HH}#L54"),
    Released("ppo", "hh-125m", "mini_batch_size", 8, f"{PPO_HH}#L81"),
    Released("ppo", "hh-*", "update_epochs", 2, f"{PPO_HH}#L56"),
    Released("ppo", "hh-*", "init_kl_coef", 0.05, f"{PPO_HH}#L57"),
    Released("ppo", "hh-*", "target_kl", 6.0, f"{PPO_HH}#L58"),
    Released("ppo", "hh-*", "gamma", 1.0, f"{PPO_HH}#L60"),
    Released("ppo", "hh-*", "gae_lambda", 0.95, f"{PPO_HH}#L61"),
    Released("ppo", "hh-*", "cliprange", 0.2, f"{PPO_HH}#L62"),
    Released("ppo", "hh-*", "cliprange_value", 0.2, f"{PPO_HH}#L63"),
    Released("ppo", "hh-*", "vf_coef", 1.0, f"{PPO_HH}#L64"),
    Released("ppo", "hh-*", "reward_scaling", "running", f"{PPO_HH}#L65"),
    Released("ppo", "hh-*", "reward_clip", 10.0, f"{PPO_HH}#L68"),
    Released("ppo", "hh-*", "dataset", "Dahoas/rm-static", f"{PPO_HH}#L206"),
    Released("ppo", "hh-*", "eval_prompts", 280, f"{PPO_HH}#L208"),
    Released("ppo", "tldr", "model_name_or_path", "CarperAI/openai_summarize_tldr_sft", f"{PPO_TLDR}#L52"),
    Released("ppo", "tldr", "unfrozen_layers", 8, f"{PPO_TLDR}#L53"),
    Released("ppo", "tldr", "learning_rate", 1e-6, f"{PPO_TLDR}#L62"),
    Released("ppo", "tldr", "adam_betas", (0.9, 0.999), f"{PPO_TLDR}#L63"),
    Released("ppo", "tldr", "adam_eps", 1e-8, f"{PPO_TLDR}#L64"),
    Released("ppo", "tldr", "weight_decay", 0.01, f"{PPO_TLDR}#L65"),
    Released("ppo", "tldr", "rollout_batch_size", 128, f"{PPO_TLDR}#L77"),
    Released("ppo", "tldr", "update_epochs", 2, f"{PPO_TLDR}#L79"),
    Released("ppo", "tldr", "init_kl_coef", 0.1, f"{PPO_TLDR}#L80"),
    Released("ppo", "tldr", "target_kl", 6.0, f"{PPO_TLDR}#L81"),
    Released("ppo", "tldr", "cliprange", 0.2, f"{PPO_TLDR}#L85"),
    Released("ppo", "tldr", "cliprange_value", 0.2, f"{PPO_TLDR}#L86"),
    Released("ppo", "tldr", "vf_coef", 0.2, f"{PPO_TLDR}#L87"),
    Released("ppo", "tldr", "reward_scaling", "none", f"{PPO_TLDR}#L88"),
    Released("ppo", "tldr", "reward_clip", 10.0, f"{PPO_TLDR}#L91"),
    Released("ppo", "tldr", "max_new_tokens", 50, f"{PPO_TLDR}#L93"),
    Released("ppo", "tldr", "max_prompt_length", 550 - 50, f"{PPO_TLDR}#L41, {TRLX_CUT}"),
    Released("ppo", "ppo-max", "learning_rate", 5e-7, f"{MOSS}/train_ppo_en.sh#L17"),
    Released("ppo", "ppo-max", "value_learning_rate", 1.5e-6, f"{MOSS}/train_ppo_en.sh#L18"),
    Released("ppo", "ppo-max", "init_kl_coef", 0.01, f"{MOSS}/train_ppo_en.sh#L27"),
    Released("ppo", "ppo-max", "cliprange", 0.2, f"{MOSS}/train_ppo_en.sh#L23"),
    Released("ppo", "ppo-max", "cliprange_value", 0.2, f"{MOSS}/train_ppo_en.sh#L22"),
    Released("ppo", "ppo-max", "lr_warmup_steps", 100, f"{MOSS}/train_ppo_en.sh#L33"),
    Released("ppo", "ppo-max", "adam_betas", (0.9, 0.95), f"{MOSS}/config_ppo.py#L22-L23"),
    Released("ppo", "ppo-max", "adam_eps", 1e-6, f"{MOSS}/config_ppo.py#L24, {MOSS}/ppo/ppo_trainer.py#L204"),
    Released("ppo", "ppo-max", "weight_decay", 0.0, f"{MOSS}/ppo/ppo_trainer.py#L186"),
    Released("ppo", "ppo-max", "max_grad_norm", 1.0, f"{MOSS}/utils.py#L65"),
    Released("ppo", "ppo-max", "temperature", 0.8, f"{MOSS}/config_ppo.py#L62"),
    Released("ppo", "ppo-max", "repetition_penalty", 1.1, f"{MOSS}/config_ppo.py#L63"),
    # apa.py and awr.py: examples/apa_hh.py (APA: LOSS "square", adv_coeff_sq = 1/λ; AWR: "log", adv_coeff_log = 1/λ),
    # apa_tldr.py, apa_off_hh.py
    *[
        row
        for script in ("apa", "awr")
        for row in [
            *trlx_hh(script, "hh-*", APA_HH, dict(seq=40, new_tokens=76, optimizer=53)),
            Released(script, "hh-*", "learning_rate", 1e-6, f"{APA_HH}#L53"),
            Released(script, "hh-*", "dataset", "Dahoas/rm-static", f"{APA_HH}#L205"),
            *trlx_hh(script, "offline-hh-*", APA_OFF, dict(seq=42, new_tokens=78, optimizer=55)),
            Released(script, "offline-hh-*", "learning_rate", 1e-6, f"{APA_OFF}#L55"),
            Released(script, "offline-hh-*", "offline_dataset", "Dahoas/rm-static", f"{APA_OFF}#L153"),
            Released(script, "offline-hh-*", "eval_prompts", 280, f"{APA_OFF}#L158"),
        ]
    ],
    Released("apa", "hh-*", "lam", 1 / 10, f"{APA_HH}#L30"),
    Released("awr", "hh-*", "lam", 1 / 0.5, f"{APA_HH}#L31"),
    Released("awr", "offline-hh-*", "lam", 1 / 1, f"{APA_OFF}#L33"),
    *[
        Released(script, presets, field, value, f"{APA_HH}#L{line}")
        for script in ("apa", "awr")
        for presets, field, value, line in [
            ("hh-125m", "model_name_or_path", "Dahoas/pythia-125M-static-sft", 88),
            ("hh-1b", "model_name_or_path", "Dahoas/pythia-1B-static-sft", 94),
            ("hh-6b", "model_name_or_path", "Dahoas/pythia-6B-static-sft", 100),
            ("hh-*", "unfrozen_layers", 2, 51),
            ("hh-125m", "rollout_batch_size", 128, 90),
            ("hh-[16]b", "rollout_batch_size", 64, 57),
            ("hh-125m", "mini_batch_size", 8, 85),
            ("hh-*", "update_epochs", 2, 59),
            ("hh-*", "gamma", 1.0, 63),
            ("hh-*", "gae_lambda", 0.95, 64),
            ("hh-*", "vf_coef", 1.0, 67),
            ("hh-*", "reward_scaling", "running", 68),
            ("hh-*", "reward_clip", 100.0, 74),
            ("hh-*", "eval_prompts", 280, 207),
        ]
    ],
    Released("apa", "tldr", "model_name_or_path", "CarperAI/openai_summarize_tldr_sft", f"{APA_TLDR}#L64"),
    Released("apa", "tldr", "unfrozen_layers", 8, f"{APA_TLDR}#L64"),
    Released("apa", "tldr", "learning_rate", 1e-6, f"{APA_TLDR}#L66"),
    Released("apa", "tldr", "adam_betas", (0.9, 0.999), f"{APA_TLDR}#L66"),
    Released("apa", "tldr", "adam_eps", 1e-8, f"{APA_TLDR}#L66"),
    Released("apa", "tldr", "weight_decay", 1e-6, f"{APA_TLDR}#L66"),
    Released("apa", "tldr", "rollout_batch_size", 128, f"{APA_TLDR}#L70"),
    Released("apa", "tldr", "update_epochs", 2, f"{APA_TLDR}#L72"),
    Released("apa", "tldr", "vf_coef", 1.0, f"{APA_TLDR}#L80"),
    Released("apa", "tldr", "reward_scaling", "running", f"{APA_TLDR}#L81"),
    Released("apa", "tldr", "reward_clip", 100.0, f"{APA_TLDR}#L87"),
    Released("apa", "tldr", "lam", 1 / 10, f"{APA_TLDR}#L35"),
    Released("apa", "tldr", "max_new_tokens", 50, f"{APA_TLDR}#L89"),
    Released("apa", "tldr", "max_prompt_length", 550 - 50, f"{APA_TLDR}#L53, {APA_TLDR}#L194, {TRLX_CUT}"),
    # ilql.py: the APA repository's ILQL HH run (examples/ilql_hh.py)
    *trlx_hh("ilql", "hh-*", ILQL_HH, dict(seq=33, new_tokens=58, optimizer=46)),
    Released("ilql", "hh-*", "learning_rate", 1e-6, f"{ILQL_HH}#L46"),
    Released("ilql", "hh-*", "offline_dataset", "Dahoas/rm-static", f"{ILQL_HH}#L110"),
    Released("ilql", "hh-*", "eval_prompts", 280, f"{ILQL_HH}#L114"),
    Released("ilql", "hh-*", "unfrozen_layers", 2, f"{ILQL_HH}#L44"),
    Released("ilql", "hh-*", "tau", 0.6, f"{ILQL_HH}#L50"),
    Released("ilql", "hh-*", "gamma", 0.99, f"{ILQL_HH}#L51"),
    Released("ilql", "hh-*", "cql_scale", 0.1, f"{ILQL_HH}#L52"),
    Released("ilql", "hh-*", "awac_scale", 1.0, f"{ILQL_HH}#L53"),
    Released("ilql", "hh-*", "alpha", 1e-4, f"{ILQL_HH}#L54"),
    Released("ilql", "hh-*", "beta_train", 0.0, f"{ILQL_HH}#L55"),
    Released("ilql", "hh-*", "steps_for_target_q_sync", 1, f"{ILQL_HH}#L56"),
    Released("ilql", "hh-*", "top_k", 20, f"{ILQL_HH}#L58"),
    Released("ilql", "hh-*", "eval_betas", [1.0, 4.0], f"{ILQL_HH}#L58"),
    Released("ilql", "hh-125m", "model_name_or_path", "Dahoas/pythia-125M-static-sft", f"{ILQL_HH}#L69"),
    Released("ilql", "hh-1b", "model_name_or_path", "Dahoas/pythia-1B-static-sft", f"{ILQL_HH}#L73"),
    Released("ilql", "hh-6b", "model_name_or_path", "Dahoas/pythia-6B-static-sft", f"{ILQL_HH}#L77"),
    # alol.py, dpo.py, pro.py: the A-LoL work's HH scripts (LoL-RL)
    *lol_hh(
        "alol",
        LOL_ALOL,
        dict(lr=49, betas="45-L46", eps=47, optimizer="632-L634", schedule=52, scheduler=636, clip=50, batch="55-L56")
        | dict(steps=76, prompt=143, generate=150),
    ),
    Released("alol", "hh-*", "value_learning_rate", 1e-5, f"{LOL_ALOL}#L187"),
    Released("alol", "hh-*", "value_epochs", 10, f"{LOL_ALOL}#L109"),
    Released("alol", "hh-*", "value_batch_size", 16, f"{LOL_ALOL}#L61, {LOL_ALOL}#L206"),
    *lol_hh(
        "dpo",
        LOL_DPO,
        dict(lr=47, betas="43-L44", eps=45, optimizer="390-L393", schedule=52, scheduler=395, clip=50, batch="55-L56")
        | dict(steps=73, prompt=443, generate=147),
    ),
    Released("dpo", "hh-*", "beta", 0.1, f"{LOL_DPO}#L108"),
    Released("dpo", "hh-*", "reference_free", False, f"{LOL_DPO}#L110"),
    Released("dpo", "hh-*", "eval_every", 900, f"{LOL_DPO}#L77, {LOL_DPO}#L525"),
    *lol_hh(
        "pro",
        LOL_PRO,
        dict(lr=49, betas="45-L46", eps=47, optimizer="369-L371", schedule=54, scheduler=373, clip=52, batch="57-L58")
        | dict(steps=76, prompt=227, generate=152),
    ),
    Released("pro", "hh-*", "sft_weight", 0.05, f"{LOL_PRO}#L113"),
    Released("pro", "hh-*", "ranking_len", 2, f"{LOL_PRO}#L107"),
    Released("pro", "hh-*", "eval_every", 900, f"{LOL_PRO}#L79, {LOL_PRO}#L483"),
]
# Not in the table, and why: the trlX runs' per-process batch of 1B and 6B models (2 or 1 rows a step, set for their
# GPUs' memory; the presets take 8), their stop strings (they add the lower-case "human:" / "assistant:"), the
# offline APA run's λ (its file ships the AWR loss; the APA setting is not given), A-LoL's evaluation interval (900
# steps scaled by the fraction of positive advantages), and the LoRA settings of the A-LoL work's scripts, which
# those scripts never read (they train further the SFT adapter they load).


@functools.cache
def parsed(script: str, name: str):
    """`python SCRIPT.py --preset NAME`'s arguments, parsed once."""
    module = importlib.import_module(script)
    return common.parse_args(module.Args, module.PRESETS, argv=["--preset", name])


@pytest.mark.parametrize("row", RELEASED, ids=lambda row: f"{row.script}-{row.presets}-{row.field}")
def test_each_preset_holds_the_released_value(row):
    module = importlib.import_module(row.script)
    names = fnmatch.filter(module.PRESETS, row.presets)
    assert names, f"{row.script}.py has no preset {row.presets}"
    for name in names:
        value = getattr(parsed(row.script, name), row.field)
        value = tuple(value) if isinstance(row.value, tuple) else value
        same = value == pytest.approx(row.value) if isinstance(row.value, float) else value == row.value
        assert same, f"{row.script}.py --preset {name}: {row.field} {value!r}, released {row.value!r} ({row.source})"


def test_every_preset_has_its_optimiser_and_lengths_in_the_table():
    """A new preset, or one whose released run is not read yet, fails here until its rows are written."""
    covered = {
        (row.script, name, row.field)
        for row in RELEASED
        for name in EXPECTED[row.script]
        if fnmatch.fnmatch(name, row.presets)
    }
    # grpo.py's presets are the methods' published settings, not one released run's script: their table of values,
    # each with its source, is tests/test_grpo_unit.py's
    released = [s for s in EXPECTED if s != "grpo"]
    needed = ("learning_rate", "adam_betas", "adam_eps", "weight_decay")
    missing = [(s, n, f) for s in released for n in EXPECTED[s] for f in needed if (s, n, f) not in covered]
    assert missing == []
    lengths = ("max_prompt_length", "max_new_tokens")
    missing = [
        (s, n, f) for s in released for n in EXPECTED[s] if n != "ppo-max" for f in lengths if (s, n, f) not in covered
    ]
    assert missing == []


class _Tiny(torch.nn.Module):
    """A model as the engines take it: parameters and a `device`."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)

    @property
    def device(self):
        return self.linear.weight.device


def test_adam_eps_reaches_adamw_in_every_script():
    """--adam-eps is AdamW's ε in DeepSpeed's config and in the plain-torch engine, and every script's engines get it
    (each makes them with the common.Placement of its parsed arguments, and no other way)."""
    assert common.deepspeed_config(0, micro_batch_size=1, lr=1e-3, eps=1e-6)["optimizer"]["params"]["eps"] == 1e-6
    assert common.deepspeed_config(0, micro_batch_size=1, lr=1e-3)["optimizer"]["params"]["eps"] == 1e-8
    engine = common.prepare_trainable(_Tiny(), "cpu", zero_stage=0, micro_batch_size=1, lr=1e-3, eps=1e-6)
    assert [group["eps"] for group in engine.optimizer.param_groups] == [1e-6]
    for script in EXPECTED:
        source = (ROOT / f"{script}.py").read_text()
        assert "place = common.Placement.of(args)" in source and "common.prepare_trainable(" not in source, script
        args = dataclasses.replace(importlib.import_module(script).Args(), adam_eps=1e-6)
        engine = common.Placement.of(args).trainable(_Tiny(), at="cpu", lr=1e-3)
        assert [group["eps"] for group in engine.optimizer.param_groups] == [1e-6], script


def _declared(tree, class_name: str) -> dict:
    """{field: docstring} of the fields a class body declares itself, read from its source."""
    import ast

    body = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == class_name).body
    return {
        node.target.id: (body[i + 1].value.value if i + 1 < len(body) and isinstance(body[i + 1], ast.Expr) else None)
        for i, node in enumerate(body)
        if isinstance(node, ast.AnnAssign)
    }


def test_the_shared_fields_are_declared_once_in_common_run_args():
    """Every script's Args extends common.RunArgs; a script re-declares a shared field only with another default,
    type or docstring than RunArgs gives it, and no field the seven scripts all declare is left out of RunArgs."""
    import ast

    shared = {field.name: field for field in dataclasses.fields(common.RunArgs)}
    shared_docs = _declared(ast.parse((ROOT / "common.py").read_text()), "RunArgs")
    own = []
    for script in EXPECTED:
        module = importlib.import_module(script)
        assert issubclass(module.Args, common.RunArgs), script
        fields = {field.name: field for field in dataclasses.fields(module.Args)}
        declared = _declared(ast.parse((ROOT / f"{script}.py").read_text()), "Args")
        for name in set(declared) & set(shared):
            ours = fields[name]
            base = shared[name]
            same_default = (ours.default, ours.default_factory) == (base.default, base.default_factory) or (
                ours.default_factory is not dataclasses.MISSING
                and base.default_factory is not dataclasses.MISSING
                and ours.default_factory() == base.default_factory()
            )
            same = same_default and ours.type == base.type and declared[name] == shared_docs[name]
            assert not same, f"{script}.Args re-declares {name} as common.RunArgs has it"
        own.append(set(declared) - set(shared))
    assert not set.intersection(*own), f"declared in every script, not in common.RunArgs: {set.intersection(*own)}"
