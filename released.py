"""Rewards that common.py reads only where an entry needs them, an optional part beside it: reward models in their
released layouts (trlX / Dahoas GPT-J, trlX TL;DR, OpenAssistant) and scoring servers (a URL --reward-model entry).

common.load_reward imports this file for a URL entry, and for a model entry asks it the model's layout
(reward_layout): a sequence-classification model is loaded by common.py itself, a released layout here
(load_released_reward). Without this file beside common.py, a model entry is read as a 1-output
sequence-classification model, and a URL entry stops with one line that names released.py.

Sections, in file order:

    1. Scoring servers             a URL entry: _remote_reward, _remote_scores, _post_json, check_url
    2. Reward models as released   reward_layout, load_released_reward: the trlX / Dahoas, trlX TL;DR and OpenAssistant
                                   layouts, each read as its released code reads it"""

import http.client
import json
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request

import torch

from common import (
    RELEASED_REVISIONS,
    _decoded_prompts,
    _first_line,
    _frozen_settings,
    _text_reward,
    fail,
    load_tokenizer,
    prepare_frozen,
    prompt_messages,
    prompt_text,
    response_texts,
)

# ---- Scoring servers: a URL --reward-model entry, POSTed JSON, retried while the server is down ----------------------
# A URL entry: rows per request, seconds a request may take, tries before giving up, and the wait before the second
# try (doubled before each next: 1, 2, 4 s)
REMOTE_BATCH = 32
REMOTE_TIMEOUT = 60.0
REMOTE_TRIES = 4
REMOTE_BACKOFF = 1.0
REMOTE_CONTRACT = 'it must take a POST of JSON {"prompts": [...], "responses": [...]} and answer {"scores": [...]}'


def check_url(url: str, flag: str = "--reward-model"):
    """A URL entry names a host (and a port, if any, that is a number)."""
    try:
        parts = urllib.parse.urlsplit(url)
        valid = bool(parts.hostname) and (parts.port is None or parts.port > 0)  # .port: ValueError if not a number
    except ValueError:
        valid = False
    if not valid:
        fail(f"{flag} {url} is not a server's URL; give it as http://HOST:PORT/PATH or https://HOST/PATH")


def _remote_reward(url: str, tokenizer):
    """A URL --reward-model entry as load_reward's score(...): the texts a module:function gets, POSTed as JSON
    {"prompts": [...], "responses": [...]}, REMOTE_BATCH rows at a time; the server answers {"scores": [...]}, one
    finite number per response. Each rank posts its own rows."""
    check_url(url)

    def score_remotely(prompts, responses):
        scores = []
        for start in range(0, len(responses), REMOTE_BATCH):
            rows = slice(start, start + REMOTE_BATCH)
            scores += _remote_scores(url, prompts=prompts[rows], responses=responses[rows])
        return scores

    return _text_reward(tokenizer, score_remotely)


def _remote_scores(url: str, prompts: list, responses: list) -> list:
    """One request: the scores the server at `url` answers for (prompts, responses), checked."""
    body = _post_json(url, {"prompts": prompts, "responses": responses})
    try:
        answer = json.loads(body, parse_int=float)  # every number a float (a huge integer: inf)
    except ValueError:  # not JSON, or not UTF-8
        fail(f"the reward server at {url} answered {_excerpt(body)}, which is not JSON; {REMOTE_CONTRACT}")
    scores = answer.get("scores") if isinstance(answer, dict) else None
    if not isinstance(scores, list):
        fail(f'the reward server at {url} answered {_excerpt(body)}, without a "scores" list; {REMOTE_CONTRACT}')
    if len(scores) != len(responses):
        fail(
            f"the reward server at {url} answered {len(scores)} scores for {len(responses)} responses; it must answer "
            f"one per response"
        )
    for score in scores:
        if not isinstance(score, float):
            fail(f"the reward server at {url} answered the score {json.dumps(score)[:80]}; each score must be a number")
        if not math.isfinite(score):
            fail(f"the reward server at {url} answered the score {score}; each score must be a finite number")
    return scores


def _post_json(url: str, payload) -> bytes:
    """POST `payload` as JSON to `url` and return the answer's body. A refused or reset connection, a timeout, a cut
    answer, 429 or 5xx is retried (REMOTE_TRIES tries, REMOTE_BACKOFF s apart, doubled each time); another 4xx, or
    a server still down after the tries, stops the run with one line."""
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    problem = None
    for attempt in range(REMOTE_TRIES):
        if attempt:
            time.sleep(REMOTE_BACKOFF * 2 ** (attempt - 1))
        try:
            with urllib.request.urlopen(request, timeout=REMOTE_TIMEOUT) as answer:
                return answer.read()
        except urllib.error.HTTPError as e:
            if e.code < 500 and e.code != 429:  # the request is wrong: the same one will not do better
                fail(f"the reward server at {url} answered HTTP {e.code} {_excerpt(e.read())}; {REMOTE_CONTRACT}")
            problem = f"HTTP {e.code} {e.reason}"
        except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut short
            problem = str(getattr(e, "reason", e)) or type(e).__name__
    fail(
        f"the reward server at {url} did not answer after {REMOTE_TRIES} tries ({problem}); start it, or give "
        f"--reward-model the URL of one that runs"
    )


def _excerpt(body: bytes, limit=80) -> str:
    """The start of a server's answer, on one line, quoted: for an error message."""
    text = " ".join(body.decode(errors="replace").split())
    return f"'{text[:limit]}{'...' if len(text) > limit else ''}'"


# ---- Reward models as released: trlX / Dahoas GPT-J, CarperAI TL;DR, OpenAssistant -----------------------------------
# A released reward model is a trunk (a transformers base model) and a 1-output linear head, stored in its own layout
# and trained on its own text; each layout below as the released code reads it (file / line of the upstream repo):
# - trlx-hh: Dahoas/gptj-rm-static holds `hf_ckpt.pt`, the state dict of Dahoas' RewardModel (Dahoas/reward-modeling
#   reward-modeling/reward_model.py:17-18: `transformer.*` a GPT-J trunk, `v_head` Linear(n_embd, 1, bias=False)) and
#   no config or tokenizer. trlX (CarperAI/trlx examples/hh/ppo_hh.py) builds the trunk from EleutherAI/gpt-j-6B
#   (l.158), pins the repo at revision 676bfd4d (l.159), scores with the gpt2 tokenizer (l.116-118) the text
#   prompt + response + EOS (l.192), left-truncated to 1024 tokens (l.178), and reads the head at the first EOS
#   (l.154-155). Dahoas trained it on the same text (reward-modeling/rm_datasets.py, PairwiseDataset).
# - trlx-tldr: CarperAI/openai_summarize_tldr_rm_checkpoint holds only `pytorch_model.bin`, the state dict of trlX's
#   GPTRewardModel (examples/summarize_rlhf/reward_model/reward_model.py:13-14, the same keys as above), trunk from
#   CarperAI/openai_summarize_tldr_sft (trlx_gptj_text_summarization.py:28, 93), tokenizer EleutherAI/gpt-j-6B
#   (l.91); text "<|startoftext|>" + prompt + response + "<|endoftext|>" (l.105), right-truncated to 550 tokens
#   (l.32, 109; the training cut, train_reward_model_gptj.py:133); the head read at the token BEFORE the first EOS
#   (reward_model.py:63-65).
# - oasst: OpenAssistant's GPTNeoXRewardModel (LAION-AI/Open-Assistant model/model_training/models/reward_model.py:
#   config model_type gpt_neox_reward_model with `pooling` (l.11-22), keys `gpt_neox.*` and `out_proj`, a
#   Linear(hidden_size, 1) WITH bias (l.50-51), pooled at the last real token or the mean (l.73-85)); its repo has the
#   config and the tokenizer. A-LoL (abaheti95/LoL-RL metrics_hh.py:44-78) scores the turns
#   "<|prompter|>…EOS<|assistant|>…EOS" (l.60-63; model_training/custom_datasets/formatting.py:10-16 names the
#   tokens), left-truncated to 1024 tokens (l.48, 68); it split the HH dialogues as PRO did, which drops or joins a
#   few paragraphs: oasst_dialogue says where and why the texts here keep them.
# A hub id is read from the local hub cache where the hub cannot be asked (HF_HUB_OFFLINE=1, no connection).
# A local folder overrides the trunk: a config.json (and tokenizer files) beside the state dict replace the base's.
RELEASED_TRUNKS = {
    "trlx-hh": ("EleutherAI/gpt-j-6B", "gpt2"),
    "trlx-tldr": ("CarperAI/openai_summarize_tldr_sft", "EleutherAI/gpt-j-6B"),
}
REWARD_LAYOUTS = (
    "hf_ckpt.pt (trlX / Dahoas GPT-J), pytorch_model.bin without config.json or with a v_head.weight "
    "(trlX TL;DR), config.json of model_type gpt_neox_reward_model (OpenAssistant), config.json with "
    "*.safetensors or *.bin weights (a sequence-classification model)"
)


def reward_layout_of(files, config=None, keys=None):
    """A reward model's layout from its top-level file names, its config.json (a dict; None without one) and, where
    known, the keys of its pytorch_model.bin: trlx-hh, trlx-tldr, oasst, score (sequence classification), or None."""
    files = set(files)
    if "hf_ckpt.pt" in files:
        return "trlx-hh"
    if (config or {}).get("model_type") == "gpt_neox_reward_model":
        return "oasst"
    if "pytorch_model.bin" in files and (config is None or "v_head.weight" in (keys or ())):
        return "trlx-tldr"
    if config is not None and any(f.endswith((".safetensors", ".bin")) for f in files):
        return "score"
    return None


def _state_dict(file: str) -> dict:
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(file)
    return torch.load(file, map_location="cpu", weights_only=True, mmap=True)  # mmap: tensors are read only when used


def _hub_snapshot(repo: str):
    """The folder of a hub repo's snapshot in the local hub cache (HF_HUB_CACHE) at its pinned revision (main without
    one), as huggingface_hub lays the cache out: models--ORG--NAME/refs/<branch, tag or short hash> holds a commit,
    snapshots/<commit>/ its files. A short commit hash that no ref names (the snapshot fetched by its full hash) is
    the one cached commit it begins. None when the cache does not hold it."""
    from huggingface_hub import constants, snapshot_download

    revision = RELEASED_REVISIONS.get(repo)
    try:
        return snapshot_download(repo, revision=revision, local_files_only=True)
    except (OSError, ValueError):  # not cached under that revision name, or not a repo name
        pass
    snapshots = os.path.join(constants.HF_HUB_CACHE, "models--" + repo.replace("/", "--"), "snapshots")
    cached = os.listdir(snapshots) if revision and os.path.isdir(snapshots) else []
    commits = [commit for commit in cached if commit.startswith(revision)]
    return os.path.join(snapshots, commits[0]) if len(commits) == 1 else None


def _hub_files(repo: str):
    """A hub repo's file names at its pinned revision: the hub's list, or, when the hub cannot be asked
    (HF_HUB_OFFLINE=1, no connection), those of its snapshot in the local hub cache. None when neither knows it."""
    from huggingface_hub import list_repo_files

    try:
        return sorted(list_repo_files(repo, revision=RELEASED_REVISIONS.get(repo)))
    except Exception:  # offline mode, no connection (an error of the HTTP library), no such repo: the cache's files
        snapshot = _hub_snapshot(repo)
        return None if snapshot is None else sorted(os.listdir(snapshot))


def _reward_file(path: str, filename: str) -> str:
    """A file of a local folder, or of a hub repo at its pinned revision where there is one: downloaded, or read from
    the local hub cache when the hub cannot be asked (HF_HUB_OFFLINE=1, no connection)."""
    if os.path.isdir(path):
        return os.path.join(path, filename)
    from huggingface_hub import hf_hub_download

    revision = RELEASED_REVISIONS.get(path)
    try:
        return hf_hub_download(path, filename, revision=revision)
    except OSError as error:  # not downloadable now and not cached under the revision's name: the snapshot's file
        snapshot = _hub_snapshot(path)
        if snapshot is not None and os.path.isfile(os.path.join(snapshot, filename)):
            return os.path.join(snapshot, filename)
        at = f" --revision {revision}" if revision else ""
        fail(
            f"cannot read {filename} of '{path}'{at} ({_first_line(error)}); without the hub (HF_HUB_OFFLINE=1, no "
            f"connection) download it first into the hub cache: hf download {path}{at}"
        )


def reward_layout(path: str) -> str:
    """The layout of a --reward-model folder or hub repo, decided from its file list (the hub's, or its cached
    snapshot's when the hub cannot be asked) and config.json (no weights downloaded); `score` for a hub name that
    neither the hub nor the cache knows, whose loading then says why."""
    files = sorted(os.listdir(path)) if os.path.isdir(path) else _hub_files(path)
    if files is None:  # neither the hub nor its cache knows it (or not a repo name): load_model then says which
        return "score"
    config = None
    if "config.json" in files:
        with open(_reward_file(path, "config.json")) as f:
            config = json.load(f)
    keys = None
    if os.path.isdir(path) and config is not None and "pytorch_model.bin" in files:
        keys = set(_state_dict(os.path.join(path, "pytorch_model.bin")))  # a v_head.weight marks trlX's TL;DR layout
    layout = reward_layout_of(files, config, keys)
    if layout is None:
        fail(
            f"'{path}' holds no reward model in a known layout (it has: {', '.join(files)[:160] or 'nothing'}); "
            f"looked for {REWARD_LAYOUTS}"
        )
    return layout


def oasst_dialogue(prompt, response: str, eos: str) -> str:
    """A prompt (an HH prompt, text or messages) and a reply as OpenAssistant's turns
    "<|prompter|>…EOS<|assistant|>…EOS", each turn's text stripped, as A-LoL scores them (LoL-RL metrics_hh.py:60-63),
    from the whole dialogue: every paragraph kept, each turn its own (hh_turns). Text without HH markers is one
    prompter turn."""
    tags = {"user": "<|prompter|>", "assistant": "<|assistant|>"}
    # Here the text differs from A-LoL's: it scored PRO's preprocessed HH data (LoL-RL README.md:15-20), split by
    # PRO's _split_dialogue (after OpenAssistant's rank_datasets.py), which drops a "\n\n" paragraph that starts with
    # neither "Human:" nor "Assistant:" (l.43-44) and joins consecutive turns of one speaker with "\n" (l.45-50):
    #   https://github.com/AlibabaResearch/DAMO-ConvAI/blob/64f4da714a5e301bbcac876e9651dd2a082d3036/PRO/train/hh_preprocess_data/step_1_process.py#L29-L55
    #   https://github.com/abaheti95/LoL-RL/blob/9f8d81660bfa0bad17ae5d7835185987f028812e/metrics_hh.py#L60-L63
    # 309 of the 4,666 HH test prompts (harmless-base and helpful-base) read differently. The reward model reads
    # here the dialogue the policy answered, the paragraphs A-LoL's text drops included.
    turns = [(m["role"], m["content"].strip()) for m in prompt_messages(prompt) if m["role"] in tags]
    turns.append(("assistant", response.strip()))
    return "".join(f"{tags[role]}{text}{eos}" for role, text in turns)


def released_text(layout: str, prompt, response: str, eos: str) -> str:
    """The text a released reward model was trained on and is scored on (see the section comment); `messages`
    prompts as their HH transcript (prompt_text)."""
    if layout == "trlx-hh":
        return prompt_text(prompt) + response + eos
    if layout == "trlx-tldr":
        return "<|startoftext|>" + prompt_text(prompt) + response + eos
    return oasst_dialogue(prompt, response, eos)


def load_released_reward(
    layout: str, path: str, tokenizer, placement="policy", zero_stage=0, micro_batch_size=8, dtype="float32"
):
    """A reward model in a released layout as load_reward's score(query_ids, query_mask, response_ids,
    response_mask) -> [batch] float32 (CPU): the policy's prompt and response decoded, put in the layout's text,
    re-encoded with the model's own tokenizer, the head read where its released code reads it."""
    from transformers import MODEL_MAPPING, AutoConfig, GPTNeoXConfig

    local_files = os.listdir(path) if os.path.isdir(path) else []  # a hub repo: the released files only
    if layout == "oasst":
        with open(_reward_file(path, "config.json")) as f:
            fields = json.load(f)
        config = GPTNeoXConfig.from_dict({k: v for k, v in fields.items() if k != "model_type"})
        pooling = fields.get("pooling") or "last"
        weights = "model.safetensors" if "model.safetensors" in local_files else "pytorch_model.bin"
        prefix = "gpt_neox."
        head_keys = ("out_proj.weight", "out_proj.bias")
        tokenizer_source = path
    else:
        base_config, base_tokenizer = RELEASED_TRUNKS[layout]
        config = AutoConfig.from_pretrained(path if "config.json" in local_files else base_config)
        pooling = "eos"
        weights = "hf_ckpt.pt" if layout == "trlx-hh" else "pytorch_model.bin"
        prefix = "transformer."
        head_keys = ("v_head.weight",)
        has_tokenizer = any(f in local_files for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
        tokenizer_source = path if has_tokenizer else base_tokenizer
    if pooling not in ("last", "mean", "eos"):
        fail(f"'{path}' has pooling '{pooling}'; OpenAssistant's reward model knows last and mean")
    state = _state_dict(_reward_file(path, weights))
    missing = [k for k in head_keys if k not in state]
    if missing:
        fail(f"'{path}' ({layout} layout) has no {', '.join(missing)} in {weights}; not a released reward checkpoint")

    # The trunk: a transformers base model built from its config and the state dict's trunk keys.
    trunk_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    trunk, info = MODEL_MAPPING[type(config)].from_pretrained(
        None, config=config, state_dict=trunk_state, dtype=getattr(torch, dtype), output_loading_info=True
    )
    if info["missing_keys"]:
        fail(
            f"'{path}' ({layout} layout) lacks {len(info['missing_keys'])} weights of its {config.model_type} trunk "
            f"(e.g. {min(info['missing_keys'])}); the trunk config must be the one it was trained from"
        )
    frozen = _frozen_settings(placement, zero_stage=zero_stage, micro_batch_size=micro_batch_size, dtype=dtype)
    trunk = prepare_frozen(trunk, **frozen)

    # The head: a 1-output linear layer, kept in float32.
    with_bias = len(head_keys) == 2
    head_state = {"weight": state[head_keys[0]].float().reshape(1, -1)}
    if with_bias:
        head_state["bias"] = state[head_keys[1]].float().reshape(1)
    head = torch.nn.Linear(head_state["weight"].shape[1], 1, bias=with_bias)
    head.load_state_dict(head_state)
    head = head.requires_grad_(False).to(trunk.device)

    reward_tokenizer = load_tokenizer(tokenizer_source, flag="--reward-model", padding_side="right")
    reward_tokenizer.truncation_side = "right" if layout == "trlx-tldr" else "left"
    max_length = 550 if layout == "trlx-tldr" else 1024

    @torch.no_grad()
    def score_released(query_ids, query_mask, response_ids, response_mask, prompts=None):
        prompts = _decoded_prompts(tokenizer, query_ids, query_mask, prompts=prompts)  # text or messages
        # the policy's response as text (its EOS dropped: the layout adds the model's own)
        responses = response_texts(tokenizer, query_ids, query_mask, response_ids, response_mask)
        joined = [
            released_text(layout, prompt=prompt, response=response, eos=reward_tokenizer.eos_token)
            for prompt, response in zip(prompts, responses)
        ]
        enc = reward_tokenizer(joined, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        ids = enc.input_ids.to(trunk.device)
        mask = enc.attention_mask.to(trunk.device)
        hidden = trunk(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        last = mask.sum(1) - 1  # right padding: the last real token (OpenAssistant's pooling "last")
        if pooling == "mean":
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            return head(pooled).squeeze(-1).cpu()
        if pooling == "eos":  # trlX: the first EOS (HH), or the token before it (TL;DR); the last token without one
            is_eos = (ids == reward_tokenizer.eos_token_id) & mask.bool()
            last = torch.where(is_eos.any(1), is_eos.int().argmax(1) - int(layout == "trlx-tldr"), last)
        return head(hidden[torch.arange(len(ids)), last]).squeeze(-1).cpu()

    return score_released
