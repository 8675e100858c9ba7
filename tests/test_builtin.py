"""The built-in task ships in builtin/, so that every machine trains on the same task. These tests check that the
shipped files are what the build code in builtin/build.py describes (its settings, vocabulary and code), that they are
whole, and that the build code still produces the same layout (a rebuild with tiny settings)."""

import json
import os

import pytest
import torch

import common

SHIPPED = common.BUILTIN_SHIPPED
build = common.optional_part("builtin/build.py")  # the build code, beside the task
REBUILD = "run `python builtin/build.py` and commit builtin/"


@pytest.fixture(scope="module")
def manifest():
    path = os.path.join(SHIPPED, common.BUILTIN_MANIFEST)
    assert os.path.exists(path), f"{path} is missing: {REBUILD}"
    with open(path) as f:
        return json.load(f)


def files_under(folder):
    """The built files of a task folder: all but MANIFEST.json, the build code and Python's bytecode cache."""
    return sorted(
        os.path.relpath(os.path.join(parent, name), folder)
        for parent, _, names in os.walk(folder)
        for name in names
        if name not in (common.BUILTIN_MANIFEST, "build.py") and os.path.basename(parent) != "__pycache__"
    )


def test_the_default_run_uses_the_shipped_task():
    assert common.resolve("builtin", "sft") == os.path.join(SHIPPED, "sft")


def test_shipped_task_was_built_by_the_current_build_code(manifest):
    rebuild = f"the build code, settings or vocabulary changed: {REBUILD}"
    assert manifest["settings"] == build.BUILTIN_SETTINGS, rebuild
    assert manifest["key"] == build.builtin_key(), rebuild


def test_shipped_files_are_whole(manifest):
    assert files_under(SHIPPED) == sorted(manifest["sha256"])  # no file missing, none added
    for name, digest in manifest["sha256"].items():
        assert build.file_sha256(os.path.join(SHIPPED, name)) == digest, name


def test_shipped_models_and_tokenizer_match_the_settings():
    from transformers import AutoConfig, AutoTokenizer

    settings = build.BUILTIN_SETTINGS
    for role in ("sft", "reward"):
        config = AutoConfig.from_pretrained(os.path.join(SHIPPED, role))
        assert (config.n_layer, config.n_embd, config.n_positions) == (
            settings["n_layer"],
            settings["n_embd"],
            settings["n_positions"],
        )
        assert config.vocab_size == len(build.VOCABULARY)
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(SHIPPED, role))
        assert tokenizer.convert_ids_to_tokens(list(range(len(build.VOCABULARY)))) == build.VOCABULARY


def test_shipped_datasets_match_the_settings_and_the_gold_score():
    import datasets

    settings = build.BUILTIN_SETTINGS
    prompts = datasets.load_from_disk(os.path.join(SHIPPED, "data", "prompts"))
    assert (len(prompts["train"]), len(prompts["test"])) == (settings["n_train_prompts"], settings["n_eval_prompts"])
    pretrain = datasets.load_from_disk(os.path.join(SHIPPED, "data", "pretrain"))
    assert len(pretrain) == settings["n_pretrain_texts"]
    offline = datasets.load_from_disk(os.path.join(SHIPPED, "data", "offline"))
    assert len(offline) == settings["n_offline_prompts"]
    assert offline["gold"] == common.builtin_gold_score(offline["response"])
    preference = datasets.load_from_disk(os.path.join(SHIPPED, "data", "preference"))
    assert 0 < len(preference) <= settings["n_rm_prompts"]
    chosen_gold = common.builtin_gold_score(preference["chosen"])
    rejected_gold = common.builtin_gold_score(preference["rejected"])
    assert all(c > r for c, r in zip(chosen_gold, rejected_gold))  # pairs are ranked by the gold score
    rankings = datasets.load_from_disk(os.path.join(SHIPPED, "data", "rankings"))
    assert len(rankings) == settings["n_ranking_prompts"]
    assert {len(r) for r in rankings["responses"]} == {len(r) for r in rankings["rewards"]} == {4}
    assert all(r.endswith("<eos>") or len(r.split()) >= 32 for row in rankings["responses"] for r in row)


def test_shipped_offline_rewards_are_the_shipped_reward_models_scores():
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    offline = datasets.load_from_disk(os.path.join(SHIPPED, "data", "offline")).select(range(64))
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(SHIPPED, "reward"))
    tokenizer.padding_side = "right"
    model = AutoModelForSequenceClassification.from_pretrained(os.path.join(SHIPPED, "reward")).eval()
    texts = [f"{p} {r}" for p, r in zip(offline["prompt"], offline["response"])]
    with torch.no_grad():
        scores = model(**tokenizer(texts, return_tensors="pt", padding=True)).logits[:, 0]
    # another CPU's kernels change the last bits only
    assert scores.tolist() == pytest.approx(offline["reward"], abs=1e-4)


def test_shipped_rankings_are_scored_by_the_shipped_reward_model():
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rankings = datasets.load_from_disk(os.path.join(SHIPPED, "data", "rankings")).select(range(16))
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(SHIPPED, "reward"))
    tokenizer.padding_side = "right"
    model = AutoModelForSequenceClassification.from_pretrained(os.path.join(SHIPPED, "reward")).eval()
    texts = [f"{p} {r}" for p, row in zip(rankings["prompt"], rankings["responses"]) for r in row]
    with torch.no_grad():
        scores = model(**tokenizer(texts, return_tensors="pt", padding=True)).logits[:, 0]
    expected = [reward for row in rankings["rewards"] for reward in row]
    assert scores.tolist() == pytest.approx(expected, abs=1e-4)
    assert rankings["gold"] == [common.builtin_gold_score(row) for row in rankings["responses"]]


def test_rebuild_with_tiny_settings_gives_the_shipped_layout(tmp_path):
    """The build code runs and writes the same files as the shipped task, with a manifest that checks out."""
    tiny = dict(
        build.BUILTIN_SETTINGS,
        sft_steps=3,
        rm_steps=2,
        n_train_prompts=16,
        n_eval_prompts=8,
        n_offline_prompts=8,
        n_rm_prompts=256,
        n_pretrain_texts=8,
        n_ranking_prompts=8,
    )
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "build.py").write_text("# the build code stays where the task is built\n")
    build.build_builtin(str(tmp_path / "task"), tiny)
    assert (tmp_path / "task" / "build.py").read_text() == "# the build code stays where the task is built\n"
    assert not (tmp_path / "task.tmp").exists()
    assert files_under(tmp_path / "task") == files_under(SHIPPED)
    with open(tmp_path / "task" / common.BUILTIN_MANIFEST) as f:
        manifest = json.load(f)
    assert manifest["settings"] == tiny
    assert manifest["key"] == build.builtin_key(tiny) != build.builtin_key()
    for name, digest in manifest["sha256"].items():
        assert build.file_sha256(tmp_path / "task" / name) == digest, name
