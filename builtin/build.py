"""The code that built the built-in task beside it (README, "The built-in task"): a tiny movie-review world that
needs no download. A stochastic grammar writes reviews from these words; the gold score is the mean polarity of a
response's words. This folder holds an SFT policy and a reward model trained on it, and prompt, offline, preference,
pretraining and ranking datasets, with MANIFEST.json (the key of the code and settings that built them, each file's
SHA-256).

    python builtin/build.py [FOLDER]    builds the task anew (default: this folder, the shipped task)

A run never builds the task: it reads this folder (common.resolve) and, on the built-in dataset, the gold score
below (common.builtin_gold_score loads this file for it)."""

import ast
import contextlib
import hashlib
import inspect
import json
import os
import platform
import random
import shutil
import sys
import time
from types import SimpleNamespace

import torch

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # common.py's folder, above this one
if PROJECT not in sys.path:  # `python builtin/build.py` puts only this folder on the path
    sys.path.insert(0, PROJECT)
from common import BUILTIN_MANIFEST, BUILTIN_SHIPPED, truncate_after_eos  # noqa: E402

# The task's words: the grammar writes reviews from them, the gold score counts their polarity
WORDS = {
    kind: words.split()
    for kind, words in dict(
        pos_adj=(
            "great wonderful brilliant superb delightful charming moving beautiful gripping stunning clever excellent "
            "fantastic lovely touching thrilling masterful fresh witty warm joyful elegant powerful memorable "
            "inventive vivid engaging heartfelt gorgeous splendid riveting dazzling uplifting hilarious tender "
            "sublime poignant captivating exquisite rich sharp smart stylish refreshing triumphant"
        ),
        neg_adj=(
            "awful terrible boring dull bland clumsy tedious weak messy lifeless shallow forgettable painful annoying "
            "confusing awkward stale silly flat lazy dreary hollow sloppy predictable pointless tiresome cheap grim "
            "muddled ugly dreadful clunky bloated incoherent tired wooden soulless overlong sluggish shoddy "
            "derivative unwatchable drab insipid"
        ),
        neu_adj=(
            "long short quiet loud slow fast simple dark bright old new familiar strange modest unusual serious "
            "light busy plain late early gentle quick small big ordinary subtle steady moody gritty lengthy"
        ),
        pos_adv="beautifully brilliantly wonderfully superbly gracefully cleverly skillfully lovingly",
        neg_adv="painfully horribly badly poorly awkwardly clumsily lazily terribly",
        pos_verb="loved enjoyed adored admired liked cherished praised treasured",
        neg_verb="hated disliked regretted resented loathed despised dreaded",
        neu_verb="watched saw noticed remember expected rewatched discussed recall",
        intensifier="really very quite rather truly fairly so",
        noun=(
            "movie film story plot script acting cast music score soundtrack dialogue ending opening pacing direction "
            "camera editing humor romance villain hero scene finale sequel premise setting costumes effects "
            "characters cinematography visuals twist climax monologue lighting makeup animation choreography casting "
            "chemistry atmosphere tone narrative subplot montage trailer runtime sets stunts"
        ),
        person=(
            "lead actor actress director writer composer villain hero newcomer star producer narrator ensemble "
            "protagonist antagonist cinematographer editor"
        ),
        function="the this a an and but i it was felt is seemed gave made performance overall , .",
    ).items()
}
POLARITY = {
    word: (1 if kind.startswith("pos") else -1)
    for kind, words in WORDS.items()
    if kind[:3] in ("pos", "neg")
    for word in words
}
PAD = "<pad>"
BOS = "<bos>"
EOS = "<eos>"
UNK = "<unk>"
VOCABULARY = [PAD, BOS, EOS, UNK] + sorted({word for words in WORDS.values() for word in words})


# sample_review, builtin_gold_score and _build_builtin are hashed into builtin_key by their syntax trees: a change to
# what they do (or to their docstrings) asks for `python builtin/build.py`. Their lambdas stay for that.
def sample_review(rng: random.Random) -> str:
    """One review from a stochastic grammar; `p_pos` makes some reviews mostly positive, some mostly negative."""
    p_pos = rng.choice([0.1, 0.25, 0.5, 0.75, 0.9])
    polar = lambda kind: rng.choice(WORDS[("pos_" if rng.random() < p_pos else "neg_") + kind])  # noqa: E731
    pick = lambda kind: rng.choice(WORDS[kind])  # noqa: E731

    def adj():
        r = rng.random()
        return pick("neu_adj") if r < 0.25 else f"{pick('intensifier')} {polar('adj')}" if r > 0.8 else polar("adj")

    verb = lambda: pick("neu_verb") if rng.random() < 0.3 else polar("verb")  # noqa: E731
    templates = [
        lambda: f"the {pick('noun')} was {adj()} .",
        lambda: f"the {pick('noun')} felt {adj()} .",
        lambda: f"i {verb()} the {pick('noun')} .",
        lambda: f"the {pick('noun')} was {adj()} and {adj()} .",
        lambda: f"the {pick('noun')} was {adj()} but the {pick('noun')} was {adj()} .",
        lambda: f"the {pick('person')} gave a {adj()} performance .",
        lambda: f"it was {polar('adv')} made .",
        lambda: f"overall , a {adj()} {rng.choice(['movie', 'film', 'story'])} .",
    ]
    return " ".join(rng.choice(templates)() for _ in range(rng.randint(2, 4)))


def builtin_gold_score(texts) -> list:
    """The task's true objective, for responses decoded WITH special tokens: mean word polarity in [-1, 1]
    (positive words +1, negative -1, punctuation not counted), minus 1 if the response never emitted <eos>."""
    words = [[w for w in text.replace(EOS, " ").split() if w not in (",", ".", PAD, BOS)] for text in texts]
    return [
        sum(POLARITY.get(w, 0) for w in ws) / max(len(ws), 1) - (0.0 if EOS in text else 1.0)
        for ws, text in zip(words, texts)
    ]


BUILTIN_SETTINGS = dict(
    seed=1234,
    n_layer=2,
    n_embd=128,
    n_positions=64,
    sft_steps=700,
    rm_steps=300,
    n_train_prompts=4096,
    n_eval_prompts=256,
    n_offline_prompts=1024,
    n_rm_prompts=2048,
    n_pretrain_texts=2048,
    n_ranking_prompts=1024,
)


def builtin_key(settings: dict = BUILTIN_SETTINGS) -> str:
    """A hash of everything the task is built from: its settings, the vocabulary and the builder's code. The code
    counts by its syntax tree, so that formatting and comments never change the key; what it does does."""
    code = [
        ast.dump(ast.parse(inspect.getsource(f)))
        for f in (sample_review, builtin_gold_score, _build_builtin, _build_builtin_rankings)
    ]
    return hashlib.sha256(json.dumps([settings, VOCABULARY, code]).encode()).hexdigest()[:12]


def build_builtin(path: str, settings: dict):
    """Build the task into `path`: built aside, then moved in when complete with MANIFEST.json last (the old one
    removed first), so a killed build never leaves half a task that looks whole; anything else in `path` (this file)
    stays. MANIFEST.json records the key, the settings, the machine it was built on and each file's SHA-256."""
    t0 = time.time()
    tmp = path.rstrip(os.sep) + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    _build_builtin(tmp, settings)
    _build_builtin_rankings(tmp, settings)
    files = sorted(
        os.path.relpath(os.path.join(folder, name), tmp) for folder, _, names in os.walk(tmp) for name in names
    )
    manifest = dict(
        key=builtin_key(settings),
        settings=settings,
        built_with=dict(
            torch=torch.__version__,
            cpu=cpu_name(),
            cpu_capability=torch.backends.cpu.get_cpu_capability(),
            threads=torch.get_num_threads(),
        ),
        build_seconds=round(time.time() - t0, 1),
        sha256={name: file_sha256(os.path.join(tmp, name)) for name in files},
    )
    with open(os.path.join(tmp, BUILTIN_MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    os.makedirs(path, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(path, BUILTIN_MANIFEST))  # no task until the new manifest is in
    for name in sorted(os.listdir(tmp), key=lambda name: name == BUILTIN_MANIFEST):  # the manifest last
        shutil.rmtree(os.path.join(path, name), ignore_errors=True)
        os.replace(os.path.join(tmp, name), os.path.join(path, name))
    os.rmdir(tmp)
    print(f"built-in task ready in {path} ({manifest['build_seconds']:.0f} s)", file=sys.stderr)


def _build_builtin(path: str, settings: dict):
    from datasets import Dataset, DatasetDict
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tqdm import tqdm
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast

    print(f"building the built-in task in {path}", file=sys.stderr)
    s = SimpleNamespace(**settings)
    rng = random.Random(s.seed)
    torch.manual_seed(s.seed)

    # A word-level tokenizer over the task's vocabulary.
    vocab = {word: i for i, word in enumerate(VOCABULARY)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece("##", cleanup=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=s.n_positions,
        clean_up_tokenization_spaces=False,
    )
    config = GPT2Config(
        vocab_size=len(vocab),
        n_positions=s.n_positions,
        n_embd=s.n_embd,
        n_layer=s.n_layer,
        n_head=4,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[PAD],
    )

    def encode(texts, side="right"):
        tok.padding_side = side
        return tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=s.n_positions)

    def train(model, steps, desc, lr, loss_fn):
        # AdamW, linear warm-up over 100 steps, then linear decay to 0.
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        schedule = lambda step: min(1.0, (step + 1) / 100) * (1 - step / steps)  # noqa: E731
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        for _ in tqdm(range(steps), desc=desc, mininterval=2):
            optimizer.zero_grad()
            loss_fn().backward()
            optimizer.step()
            scheduler.step()
        model.eval().requires_grad_(False)  # trained: no autograd graphs from here on

    # 1. The SFT policy: next-token NLL on grammar reviews ending in <eos>.
    def sft_loss():
        batch = encode([sample_review(rng) + f" {EOS}" for _ in range(64)])
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        return sft(**batch, labels=labels).loss

    sft = GPT2LMHeadModel(config)
    train(sft, s.sft_steps, "builtin: SFT policy", 3e-3, sft_loss)

    def prompts(n):  # the first 2-5 words of a review
        return [" ".join(sample_review(rng).split()[: rng.randint(2, 5)]) for _ in range(n)]

    @torch.no_grad()
    def sample(prompt_list, temperature=1.0):  # responses of the SFT policy, cut after <eos> (kept in the text)
        enc = encode(prompt_list, side="left")
        generated = sft.generate(
            **enc,
            do_sample=True,
            top_k=0,
            temperature=temperature,
            max_new_tokens=32,
            pad_token_id=vocab[PAD],
            eos_token_id=vocab[EOS],
        )
        ids, mask, _ = truncate_after_eos(generated[:, enc.input_ids.shape[1] :], vocab[EOS], vocab[PAD])
        return [tok.decode(row[:n]) for row, n in zip(ids.tolist(), mask.sum(1).tolist())]

    train_prompts = prompts(s.n_train_prompts)
    eval_prompts = prompts(s.n_eval_prompts)
    offline_prompts = prompts(s.n_offline_prompts)
    rm_prompts = prompts(s.n_rm_prompts)

    # 2. The reward model: Bradley-Terry on pairs of SFT responses ranked by the gold score (a learned proxy reward).
    first = sample(rm_prompts)
    second = sample(rm_prompts, temperature=1.3)
    pairs = []
    for prompt, a, b, gold_a, gold_b in zip(
        rm_prompts, first, second, builtin_gold_score(first), builtin_gold_score(second)
    ):
        if gold_a != gold_b:
            pairs.append((prompt, a, b) if gold_a > gold_b else (prompt, b, a))

    def rm_loss():
        batch = rng.sample(pairs, 64)
        chosen = [f"{prompt} {c}" for prompt, c, _ in batch]
        rejected = [f"{prompt} {r}" for prompt, _, r in batch]
        scores = rm(**encode(chosen + rejected)).logits[:, 0]
        return -torch.nn.functional.logsigmoid(scores[:64] - scores[64:]).mean()

    rm = GPT2ForSequenceClassification(GPT2Config(**{**config.to_dict(), "num_labels": 1}))
    train(rm, s.rm_steps, "builtin: reward model", 1e-3, rm_loss)

    # 3. Save the models, each with the tokenizer, and the datasets.
    for model, name in ((sft, "sft"), (rm, "reward")):
        model.save_pretrained(f"{path}/{name}")
        tok.save_pretrained(f"{path}/{name}")
    offline = sample(offline_prompts)
    offline_rewards = rm(**encode([f"{p} {r}" for p, r in zip(offline_prompts, offline)])).logits[:, 0].tolist()
    prompt_splits = DatasetDict(
        train=Dataset.from_dict({"prompt": train_prompts}),
        test=Dataset.from_dict({"prompt": eval_prompts}),
    )
    prompt_splits.save_to_disk(f"{path}/data/prompts")
    offline_rows = {
        "prompt": offline_prompts,
        "response": offline,
        "reward": offline_rewards,
        "gold": builtin_gold_score(offline),
    }
    Dataset.from_dict(offline_rows).save_to_disk(f"{path}/data/offline")
    preference_rows = {
        "prompt": [prompt for prompt, _, _ in pairs],
        "chosen": [chosen for _, chosen, _ in pairs],
        "rejected": [rejected for _, _, rejected in pairs],
    }
    Dataset.from_dict(preference_rows).save_to_disk(f"{path}/data/preference")
    pretrain_texts = [sample_review(rng) for _ in range(s.n_pretrain_texts)]
    Dataset.from_dict({"text": pretrain_texts}).save_to_disk(f"{path}/data/pretrain")


def _build_builtin_rankings(path: str, settings: dict):
    """Rankings for PRO: for each of `n_ranking_prompts` prompts (the first 2-5 words of a review), 4 samples of the
    SFT policy in path/sft (temperature 1, at most 32 new tokens, cut after <eos>), each scored by the reward model
    in path/reward. Saved to path/data/rankings as {prompt, responses, rewards, gold}."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    s = SimpleNamespace(**settings)
    rng = random.Random(s.seed + 1)
    torch.manual_seed(s.seed + 1)
    tok = AutoTokenizer.from_pretrained(f"{path}/sft")
    sft = AutoModelForCausalLM.from_pretrained(f"{path}/sft").eval()
    rm = AutoModelForSequenceClassification.from_pretrained(f"{path}/reward").eval()
    n_candidates = 4
    prompts = [" ".join(sample_review(rng).split()[: rng.randint(2, 5)]) for _ in range(s.n_ranking_prompts)]
    repeated = [prompt for prompt in prompts for _ in range(n_candidates)]
    responses = []
    rewards = []
    with torch.no_grad():
        for start in range(0, len(repeated), 256):
            chunk = repeated[start : start + 256]
            tok.padding_side = "left"
            enc = tok(chunk, return_tensors="pt", padding=True)
            generated = sft.generate(
                **enc,
                do_sample=True,
                top_k=0,
                temperature=1.0,
                max_new_tokens=32,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
            ids, mask, _ = truncate_after_eos(
                generated[:, enc.input_ids.shape[1] :], eos_id=tok.eos_token_id, pad_id=tok.pad_token_id
            )
            texts = [tok.decode(row[:n]) for row, n in zip(ids.tolist(), mask.sum(1).tolist())]
            tok.padding_side = "right"
            scored = tok([f"{p} {r}" for p, r in zip(chunk, texts)], return_tensors="pt", padding=True)
            responses += texts
            rewards += rm(**scored).logits[:, 0].tolist()
    rows = {
        "prompt": prompts,
        "responses": [responses[i : i + n_candidates] for i in range(0, len(responses), n_candidates)],
        "rewards": [rewards[i : i + n_candidates] for i in range(0, len(rewards), n_candidates)],
        "gold": [builtin_gold_score(responses[i : i + n_candidates]) for i in range(0, len(responses), n_candidates)],
    }
    Dataset.from_dict(rows).save_to_disk(f"{path}/data/rankings")


def cpu_name() -> str:
    """The processor's model name, as /proc/cpuinfo gives it (the machine type where it gives none)."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.machine()


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build the built-in task anew (python builtin/build.py [FOLDER]).")
    parser.add_argument(
        "folder",
        nargs="?",
        default=BUILTIN_SHIPPED,
        help="where to build it (default: the shipped builtin/ beside common.py)",
    )
    build_builtin(parser.parse_args().folder, BUILTIN_SETTINGS)
