"""Reward models as released (released.py, "Reward models as released"): each layout is written tiny and random to a
folder exactly as its authors stored it, loaded through common.load_reward, and its score checked against a hand
computation with plain transformers modules on the text its released code scores (so a wrong text format, a wrong
read position or a random head fails). The same three under their hub ids with HF_HUB_OFFLINE=1, from a hub cache laid
out as huggingface_hub lays it out: scored by the same recipe at trlX's pinned revision, and apa.py run with them.
Also: the layout of every `launch.sh paper` reward model from the real repos' file lists, and one error line for a
folder in no known layout. CPU, offline, about a minute (two subprocesses)."""

import hashlib
import importlib
import json
import os
import shlex
import subprocess
import sys
from typing import NamedTuple

import pytest
import torch
from conftest import ROOT, TINY_ONLINE, read_run, run_script

import common
import released

GPT2_TOKENIZER = ROOT.parent / "shared" / "data" / "tokenizers" / "gpt2"
EOS = "<|endoftext|>"
PROMPTS = [
    "\n\nHuman: How do I bake bread?\n\nAssistant:",
    "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke.\n\nAssistant:",
    "SUBREDDIT: r/cooking\nTITLE: flat bread\nPOST: My bread does not rise at all.\nTL;DR:",
]
RESPONSES = [" Mix flour, water and yeast, then bake it.", " Why did the chicken cross the road?", " bread is flat"]
# OpenAssistant's turns for PROMPTS + RESPONSES, written out by hand (LoL-RL metrics_hh.py:60-63)
OASST_TEXTS = [
    f"<|prompter|>How do I bake bread?{EOS}<|assistant|>Mix flour, water and yeast, then bake it.{EOS}",
    (
        f"<|prompter|>Hi there{EOS}<|assistant|>Hello! How can I help?{EOS}<|prompter|>Tell me a joke.{EOS}"
        f"<|assistant|>Why did the chicken cross the road?{EOS}"
    ),
    (
        f"<|prompter|>SUBREDDIT: r/cooking\nTITLE: flat bread\nPOST: My bread does not rise at all.\nTL;DR:{EOS}"
        f"<|assistant|>bread is flat{EOS}"
    ),
]


@pytest.fixture(scope="module")
def gpt2():
    """The real GPT-2 BPE tokenizer (GPT-J's and trlX's gpt2 share it), from the shared data folder: no hub."""
    from transformers import AutoTokenizer

    if not (GPT2_TOKENIZER / "tokenizer.json").exists():
        pytest.fail(
            f"the GPT-2 tokenizer is missing: these tests need {GPT2_TOKENIZER} (tokenizer.json, vocab.json, "
            f"merges.txt), the shared data folder beside the project"
        )
    return AutoTokenizer.from_pretrained(str(GPT2_TOKENIZER))


def policy_batch(tok):
    """PROMPTS left-padded and RESPONSES right-padded with the policy's (GPT-2) ids; the first response ends with EOS
    (mask 1, as truncate_after_eos leaves it). Padding slots hold garbage ids: only the masks say what is padding."""
    prompts = [tok(p).input_ids for p in PROMPTS]
    responses = [tok(r).input_ids + ([tok.eos_token_id] if i == 0 else []) for i, r in enumerate(RESPONSES)]
    P, R = max(map(len, prompts)), max(map(len, responses))
    q, r = torch.full((3, P), 17), torch.full((3, R), 23)
    qm, rm = torch.zeros(3, P, dtype=torch.long), torch.zeros(3, R, dtype=torch.long)
    for i, (p, s) in enumerate(zip(prompts, responses)):
        q[i, P - len(p) :], qm[i, P - len(p) :] = torch.tensor(p), 1
        r[i, : len(s)], rm[i, : len(s)] = torch.tensor(s), 1
    return q, qm, r, rm


def tiny_gptj(vocab_size):
    from transformers import GPTJConfig, GPTJModel

    torch.manual_seed(0)
    config = GPTJConfig(
        vocab_size=vocab_size,
        n_positions=256,
        n_embd=32,
        n_layer=2,
        n_head=2,
        rotary_dim=8,
        bos_token_id=50256,
        eos_token_id=50256,
    )
    return GPTJModel(config).eval()


def trlx_state_dict(trunk, head_weight):
    """A trlX / Dahoas RewardModel's state dict: `transformer.*` and a bias-free `v_head.weight` [1, n_embd], plus the
    causal-mask buffer old transformers saved with GPT-J (ignored on load)."""
    state = {f"transformer.{k}": v for k, v in trunk.state_dict().items()}
    return {**state, "v_head.weight": head_weight, "transformer.h.0.attn.masked_bias": torch.tensor(-1e9)}


def hand_scores(trunk, tok, texts, position, weight, bias=0.0):
    """Each text encoded alone (no padding), the trunk's last hidden state at `position(ids)` times the head."""
    scores = []
    for text in texts:
        ids = tok(text).input_ids
        with torch.no_grad():
            hidden = trunk(input_ids=torch.tensor([ids])).last_hidden_state[0]
        scores.append(float(hidden[position(ids)] @ weight.reshape(-1) + bias))
    return torch.tensor(scores)


def test_trlx_hh_hf_ckpt_appends_eos_and_reads_the_first_eos(tmp_path, gpt2):
    trunk = tiny_gptj(len(gpt2))
    weight = torch.randn(1, 32)
    folder = tmp_path / "gptj-rm-static"  # hf_ckpt.pt with the trunk's config.json and a tokenizer beside it
    folder.mkdir()
    torch.save(trlx_state_dict(trunk, weight), folder / "hf_ckpt.pt")
    trunk.config.save_pretrained(folder)
    gpt2.save_pretrained(folder)
    assert released.reward_layout(str(folder)) == "trlx-hh"
    score = common.load_reward(str(folder), gpt2)
    got = score(*policy_batch(gpt2))
    texts = [p + r + EOS for p, r in zip(PROMPTS, RESPONSES)]
    want = hand_scores(trunk, gpt2, texts, lambda ids: ids.index(gpt2.eos_token_id), weight)
    assert not score.same_vocabulary and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    without_eos = hand_scores(trunk, gpt2, [p + r for p, r in zip(PROMPTS, RESPONSES)], lambda ids: -1, weight)
    assert (got - without_eos).abs().max() > 1e-2  # the EOS position matters: the test would see it missing


def test_trlx_hh_bare_state_dict_takes_its_trunk_from_the_base(tmp_path, gpt2, monkeypatch):
    """As on the hub (hf_ckpt.pt alone): the trunk config and tokenizer come from RELEASED_TRUNKS (EleutherAI/gpt-j-6B
    and gpt2 for the real thing; a local folder here)."""
    trunk = tiny_gptj(len(gpt2))
    weight = torch.randn(1, 32)
    (bare := tmp_path / "bare").mkdir()
    (base := tmp_path / "base").mkdir()
    torch.save(trlx_state_dict(trunk, weight), bare / "hf_ckpt.pt")
    trunk.config.save_pretrained(base)
    gpt2.save_pretrained(base)
    assert released.RELEASED_TRUNKS["trlx-hh"] == ("EleutherAI/gpt-j-6B", "gpt2")
    monkeypatch.setitem(released.RELEASED_TRUNKS, "trlx-hh", (str(base), str(base)))
    got = common.load_reward(str(bare), gpt2)(*policy_batch(gpt2))
    texts = [p + r + EOS for p, r in zip(PROMPTS, RESPONSES)]
    want = hand_scores(trunk, gpt2, texts, lambda ids: ids.index(gpt2.eos_token_id), weight)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_trlx_tldr_wraps_the_text_and_reads_the_token_before_eos(tmp_path, gpt2, monkeypatch):
    trunk = tiny_gptj(len(gpt2))
    weight = torch.randn(1, 32)
    texts = [f"<|startoftext|>{p}{r}{EOS}" for p, r in zip(PROMPTS, RESPONSES)]
    want = hand_scores(trunk, gpt2, texts, lambda ids: ids.index(gpt2.eos_token_id) - 1, weight)
    (bare := tmp_path / "openai_summarize_tldr_rm_checkpoint").mkdir()  # as on the hub: pytorch_model.bin alone
    torch.save(trlx_state_dict(trunk, weight), bare / "pytorch_model.bin")
    (base := tmp_path / "sft").mkdir()
    trunk.config.save_pretrained(base)
    gpt2.save_pretrained(base)
    monkeypatch.setitem(released.RELEASED_TRUNKS, "trlx-tldr", (str(base), str(base)))
    assert released.reward_layout(str(bare)) == "trlx-tldr"
    torch.testing.assert_close(common.load_reward(str(bare), gpt2)(*policy_batch(gpt2)), want, atol=1e-4, rtol=1e-4)
    # the same state dict with its config.json and tokenizer beside it: still trlX's layout (its v_head says so)
    trunk.config.save_pretrained(bare)
    gpt2.save_pretrained(bare)
    monkeypatch.setitem(released.RELEASED_TRUNKS, "trlx-tldr", ("no/such-trunk", "no/such-tokenizer"))
    assert released.reward_layout(str(bare)) == "trlx-tldr"
    got = common.load_reward(str(bare), gpt2)(*policy_batch(gpt2))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    plain = hand_scores(trunk, gpt2, [p + r for p, r in zip(PROMPTS, RESPONSES)], lambda ids: -1, weight)
    assert (got - plain).abs().max() > 1e-2  # without "<|startoftext|>" the scores differ: the wrapping is tested


class Oasst(NamedTuple):
    """A tiny OpenAssistant reward model written to a folder, and what its hand computation needs."""

    trunk: torch.nn.Module
    tokenizer: object
    weight: torch.Tensor
    bias: torch.Tensor


def oasst_folder(folder, gpt2) -> Oasst:
    """OpenAssistant's layout: config.json of model_type gpt_neox_reward_model, pytorch_model.bin (`gpt_neox.*`,
    `out_proj` with bias) and its tokenizer with the <|prompter|> / <|assistant|> tokens."""
    from transformers import GPTNeoXConfig, GPTNeoXModel

    tok = gpt2.__class__.from_pretrained(str(GPT2_TOKENIZER))
    tok.add_special_tokens({"additional_special_tokens": ["<|prompter|>", "<|assistant|>"]})  # as OA's tokenizer
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        rotary_pct=0.25,
    )
    trunk = GPTNeoXModel(config).eval()
    weight, bias = torch.randn(1, 32), torch.randn(1)
    folder.mkdir()
    state = {f"gpt_neox.{k}": v for k, v in trunk.state_dict().items()}
    torch.save({**state, "out_proj.weight": weight, "out_proj.bias": bias}, folder / "pytorch_model.bin")
    fields = {
        **config.to_dict(),
        "model_type": "gpt_neox_reward_model",
        "pooling": "last",
        "architectures": ["GPTNeoXRewardModel"],
    }
    (folder / "config.json").write_text(json.dumps(fields))
    tok.save_pretrained(folder)
    return Oasst(trunk=trunk, tokenizer=tok, weight=weight, bias=bias)


def test_oasst_gpt_neox_reward_model_scores_prompter_assistant_turns(tmp_path, gpt2):
    folder = tmp_path / "oasst-rm"
    trunk, tok, weight, bias = oasst_folder(folder, gpt2)
    assert released.reward_layout(str(folder)) == "oasst"
    assert [released.oasst_dialogue(p, r, EOS) for p, r in zip(PROMPTS, RESPONSES)] == OASST_TEXTS
    assert tok("<|prompter|>Hi").input_ids[0] == tok.convert_tokens_to_ids("<|prompter|>")  # one token, as in OA's
    score = common.load_reward(str(folder), gpt2)
    got = score(*policy_batch(gpt2))
    want = hand_scores(trunk, tok, OASST_TEXTS, lambda ids: -1, weight, float(bias))  # the last real token + bias
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    no_bias = hand_scores(trunk, tok, OASST_TEXTS, lambda ids: -1, weight)
    assert not score.same_vocabulary and (got - no_bias).abs().min() > 1e-3 * abs(float(bias)) > 0


def test_a_folder_in_no_known_layout_is_one_error_line(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(SystemExit) as info:
        common.load_reward(str(tmp_path), None)
    message = str(info.value)
    assert message.startswith("error:") and "\n" not in message
    for looked_for in ("hf_ckpt.pt", "pytorch_model.bin", "gpt_neox_reward_model", "config.json", "safetensors"):
        assert looked_for in message
    assert "weights.npz" in message  # and what the folder has


def test_the_standard_layout_still_loads_as_sequence_classification(builtin_path):
    assert released.reward_layout(common.resolve("builtin", "reward")) == "score"


# Top-level files of the released repos (their hub "Files" pages and commit histories, as stored by the search
# tools): Dahoas/gptj-rm-static at trlX's pinned revision 676bfd4d (commit "Delete pytorch_model.bin", after
# hf_ckpt.pt was uploaded and config.json deleted); CarperAI's TL;DR RM (2 commits: .gitattributes,
# pytorch_model.bin); OpenAssistant's RM 2.1 (model, tokenizer, README, LICENSE uploads) and its config.json fields.
OASST_CONFIG = {
    "architectures": ["GPTNeoXRewardModel"],
    "model_type": "gpt_neox_reward_model",
    "pooling": "last",
    "hidden_size": 2048,
    "num_hidden_layers": 24,
    "vocab_size": 50288,
}
HUB_REPOS = {
    "Dahoas/gptj-rm-static": ([".gitattributes", "hf_ckpt.pt"], None),
    "CarperAI/openai_summarize_tldr_rm_checkpoint": ([".gitattributes", "pytorch_model.bin"], None),
    "OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5": (
        [
            ".gitattributes",
            "LICENSE",
            "README.md",
            "config.json",
            "pytorch_model.bin",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ],
        OASST_CONFIG,
    ),
}
PAPER_LAYOUTS = {
    "apa-hh": "trlx-hh",
    "awr-hh": "trlx-hh",
    "ppo-hh": "trlx-hh",
    "ilql-hh": "trlx-hh",
    "apa-off-hh": "trlx-hh",
    "awr-off-hh": "trlx-hh",
    "apa-tldr": "trlx-tldr",
    "ppo-tldr": "trlx-tldr",
    "alol-hh": "oasst",
    "dpo-hh": "oasst",
    "pro-hh": "oasst",
}


def test_every_paper_preset_reward_model_maps_to_its_released_layout():
    listed = subprocess.run(
        ["bash", str(ROOT / "launch.sh"), "paper", "--list"], capture_output=True, text=True, check=False
    )
    assert sorted(line.split()[0] for line in listed.stdout.splitlines() if line[:1] != " ") == sorted(PAPER_LAYOUTS)
    for preset, layout in PAPER_LAYOUTS.items():
        proc = subprocess.run(
            ["bash", str(ROOT / "launch.sh"), "paper", preset, "--dry-run"], capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0, proc.stderr
        words = shlex.split(proc.stdout.strip().splitlines()[-1])
        script = next(word for word in words if word.endswith(".py"))
        module = importlib.import_module(script.rsplit("/", 1)[-1][:-3])  # launch.sh gives the script by its path
        args = common.parse_args(module.Args, module.PRESETS, argv=words[words.index(script) + 1 :])
        name = args.reward_model[0]
        files, config = HUB_REPOS[name]
        assert released.reward_layout_of(files, config) == layout, (preset, name)
    assert released.RELEASED_REVISIONS == {"Dahoas/gptj-rm-static": "676bfd4d"}


def test_layout_rules_on_file_lists():
    hf_folder = ["config.json", "model.safetensors", "tokenizer.json"]
    assert released.reward_layout_of(hf_folder, {"model_type": "gpt2"}) == "score"
    assert released.reward_layout_of(["config.json", "pytorch_model.bin"], {"model_type": "gptj"}) == "score"
    assert (
        released.reward_layout_of(
            ["config.json", "pytorch_model.bin"],
            {"model_type": "gptj"},
            keys={"transformer.wte.weight", "v_head.weight"},
        )
        == "trlx-tldr"
    )
    assert (
        released.reward_layout_of([".gitattributes", "hf_ckpt.pt", "config.json"], {"model_type": "gptj"}) == "trlx-hh"
    )  # the config.json of the repo's open PR #1 changes nothing
    assert released.reward_layout_of(["config.json"], {"model_type": "gpt2"}) is None
    assert released.reward_layout_of(["README.md"]) is None
    assert (
        released.oasst_dialogue("Summarize this.", " ok ", EOS)
        == f"<|prompter|>Summarize this.{EOS}<|assistant|>ok{EOS}"
    )


def test_oasst_dialogue_keeps_every_paragraph_and_each_turn():
    """The dialogue as the policy read it: a paragraph that starts no turn stays in its turn, and two turns of one
    speaker stay two. A-LoL's text (PRO's _split_dialogue, see oasst_dialogue) drops the one and joins the other."""
    prompt = "\n\nHuman: Sort this list:\n\n1. milk\n2. eggs\n\nHuman: Alphabetically.\n\nAssistant:"
    ours = released.oasst_dialogue(prompt, " 1. eggs 2. milk", EOS)
    assert ours == (
        f"<|prompter|>Sort this list:\n\n1. milk\n2. eggs{EOS}<|prompter|>Alphabetically.{EOS}"
        f"<|assistant|>1. eggs 2. milk{EOS}"
    )
    assert ours != f"<|prompter|>Sort this list:\nAlphabetically.{EOS}<|assistant|>1. eggs 2. milk{EOS}"  # A-LoL's


# ---- The released repos by hub id with HF_HUB_OFFLINE=1, from a hub cache laid out as huggingface_hub lays it out ----
TLDR_RM = "CarperAI/openai_summarize_tldr_rm_checkpoint"
OASST_RM = "OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5"


def commit_of(name: str) -> str:
    """A 40-hex commit hash (any will do: the cache names snapshots by commit)."""
    return hashlib.sha1(name.encode()).hexdigest()


PINNED_COMMIT = "676bfd4d" + commit_of("pinned")[8:]  # the commit trlX's short pin 676bfd4d names


def cache_repo(cache, repo: str, folder, commit: str, refs=("main",)):
    """`folder`'s files put into a hub cache as huggingface_hub stores a download: models--ORG--NAME/blobs/<hash>,
    snapshots/<commit>/<file> a relative link to its blob, refs/<branch or revision asked for> holding the commit."""
    storage = cache / ("models--" + repo.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (storage / "blobs").mkdir(exist_ok=True)
    (storage / "refs").mkdir(exist_ok=True)
    for file in sorted(folder.iterdir()):
        data = file.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (storage / "blobs" / blob).write_bytes(data)
        (snapshot / file.name).symlink_to(f"../../blobs/{blob}")
    for ref in refs:
        (storage / "refs" / ref).write_text(commit)


class HubCache(NamedTuple):
    path: object  # HF_HUB_CACHE
    scores: dict  # hub id -> policy_batch's scores by the released recipe (hand_scores)
    later_scores: torch.Tensor  # Dahoas/gptj-rm-static's scores at its later main, which trlX's pin avoids


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, gpt2) -> HubCache:
    """The three released reward models under their hub ids, tiny and random, with the bases their bare state dicts
    take the trunk config and tokenizer from (EleutherAI/gpt-j-6B, gpt2, CarperAI/openai_summarize_tldr_sft), in one
    hub cache. Dahoas/gptj-rm-static has the pinned commit (refs/676bfd4d, as a download of that revision leaves it)
    and a later main with another head."""
    from transformers import GPT2Config

    root = tmp_path_factory.mktemp("hub")
    cache = root / "cache"
    trunk = tiny_gptj(len(gpt2))
    (gptj := root / "gpt-j-6B").mkdir()  # the trunk config, and the GPT-2 BPE as GPT-J's tokenizer
    trunk.config.save_pretrained(gptj)
    gpt2.save_pretrained(gptj)
    cache_repo(cache, "EleutherAI/gpt-j-6B", gptj, commit_of("gpt-j"))
    (bpe := root / "gpt2").mkdir()  # the tokenizer and its config.json (AutoTokenizer reads the model type there)
    GPT2Config().save_pretrained(bpe)
    gpt2.save_pretrained(bpe)
    cache_repo(cache, "gpt2", bpe, commit_of("gpt2"))
    (sft := root / "sft").mkdir()
    trunk.config.save_pretrained(sft)
    cache_repo(cache, "CarperAI/openai_summarize_tldr_sft", sft, commit_of("sft"))
    heads = {"pinned": torch.randn(1, 32), "later": torch.randn(1, 32), "tldr": torch.randn(1, 32)}
    for name, commit, refs in (("pinned", PINNED_COMMIT, ("676bfd4d",)), ("later", commit_of("later"), ("main",))):
        (folder := root / name).mkdir()
        torch.save(trlx_state_dict(trunk, heads[name]), folder / "hf_ckpt.pt")
        cache_repo(cache, "Dahoas/gptj-rm-static", folder, commit, refs)
    (tldr := root / "tldr").mkdir()
    torch.save(trlx_state_dict(trunk, heads["tldr"]), tldr / "pytorch_model.bin")
    cache_repo(cache, TLDR_RM, tldr, commit_of("tldr"))
    oasst = oasst_folder(root / "oasst", gpt2)
    cache_repo(cache, OASST_RM, root / "oasst", commit_of("oasst"))

    hh_texts = [p + r + EOS for p, r in zip(PROMPTS, RESPONSES)]
    tldr_texts = [f"<|startoftext|>{p}{r}{EOS}" for p, r in zip(PROMPTS, RESPONSES)]

    def at_eos(ids):
        return ids.index(gpt2.eos_token_id)

    return HubCache(
        path=cache,
        scores={
            "Dahoas/gptj-rm-static": hand_scores(trunk, gpt2, hh_texts, at_eos, heads["pinned"]),
            TLDR_RM: hand_scores(trunk, gpt2, tldr_texts, lambda ids: at_eos(ids) - 1, heads["tldr"]),
            OASST_RM: hand_scores(oasst.trunk, oasst.tokenizer, OASST_TEXTS, lambda ids: -1, oasst.weight, oasst.bias),
        },
        later_scores=hand_scores(trunk, gpt2, hh_texts, at_eos, heads["later"]),
    )


# common.load_reward by hub id in a process that sees only the hub cache: each repo's layout and scores as JSON
SCORE_BY_HUB_ID = """
import json
import sys
import test_reward_layouts as t  # first: its conftest puts the project on sys.path
import common
import released
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(str(t.GPT2_TOKENIZER))
rows = t.policy_batch(tok)
print(json.dumps({n: [released.reward_layout(n), common.load_reward(n, tok)(*rows).tolist()] for n in sys.argv[1:]}))
"""


def offline(cache) -> dict:
    return {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}


def test_released_reward_models_by_hub_id_offline_score_as_released(hub_cache):
    assert sorted(hub_cache.scores) == sorted(HUB_REPOS)  # the ids the paper presets name
    proc = subprocess.run(
        [sys.executable, "-c", SCORE_BY_HUB_ID, *hub_cache.scores],
        cwd=ROOT / "tests",
        env={**os.environ, **offline(hub_cache.path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, want in hub_cache.scores.items():
        assert got[name][0] == released.reward_layout_of(*HUB_REPOS[name]), name
        torch.testing.assert_close(torch.tensor(got[name][1]), want, atol=1e-4, rtol=1e-4)
    # the pinned commit was read, not main's later upload
    assert (torch.tensor(got["Dahoas/gptj-rm-static"][1]) - hub_cache.later_scores).abs().max() > 1e-2


def test_apa_runs_offline_with_each_released_reward_model_by_hub_id(hub_cache, builtin_path, tmp_path):
    run_script(
        "apa.py",
        *TINY_ONLINE,
        "--reward-model",
        *hub_cache.scores,
        "--output-dir",
        str(tmp_path),
        env=offline(hub_cache.path),
    )
    run, records = read_run(tmp_path)
    assert json.loads((run / "args.json").read_text())["reward_model"] == list(hub_cache.scores)
    assert len(records) > 1 and all(torch.isfinite(torch.tensor(r["rollout/score"])) for r in records[1:])


def test_a_short_pinned_revision_without_its_ref_is_the_cached_commit_it_begins(tmp_path, monkeypatch):
    """A snapshot fetched by its full hash has no refs/676bfd4d: the pin still finds it, not main's later commit; a
    repo the cache lacks is one error line that names the download."""
    from huggingface_hub import constants

    for name, commit, refs in (("pinned", PINNED_COMMIT, ()), ("later", commit_of("later"), ("main",))):
        (folder := tmp_path / name).mkdir()
        (folder / "hf_ckpt.pt").write_text(name)
        cache_repo(tmp_path / "cache", "Dahoas/gptj-rm-static", folder, commit, refs)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    assert constants.HF_HUB_OFFLINE
    assert released.reward_layout("Dahoas/gptj-rm-static") == "trlx-hh"
    with open(released._reward_file("Dahoas/gptj-rm-static", "hf_ckpt.pt")) as f:
        assert f.read() == "pinned"
    assert released.reward_layout(TLDR_RM) == "score"  # not cached: loading it as a classifier then says why
    with pytest.raises(SystemExit) as info:
        released._reward_file(TLDR_RM, "pytorch_model.bin")
    message = str(info.value)
    assert message.startswith("error:") and "\n" not in message and f"hf download {TLDR_RM}" in message
