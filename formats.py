"""Dataset and prompt formats beyond plain columns, an optional part beside common.py: Anthropic HH dialogues, chat
messages and the chat template's turns, PRO's and A-LoL's ranked rows, TL;DR rows. A prompt is a text or a list of
chat messages [{role, content}].

common.py reads plain columns ({prompt}, {prompt, response, reward}, {prompt, chosen, rejected}) itself and imports
this file only where a row's shape or --chat-template needs it (common.canonical_rows, prompt_messages, prompt_text,
fitting_prompts, encode_prompts, load_rankings). Without it beside common.py, such a run stops with one line that
names it.

Sections, in file order:

    1. Dataset shapes              canonical_rows: HH transcripts, `messages`, PRO rows (pro_pairs, pro_rankings), TL;DR
    2. Chat messages               split_hh, hh_turns, prompt_messages, prompt_text, split_messages
    3. Chat prompts in a budget    fitting_prompts, fit_chat_prompt: whole turns dropped from the start"""

import os
import re

from common import fail, note, prompt_budget, render_prompts

# ---- Dataset shapes: HH transcripts, chat conversations, PRO rows, TL;DR rows ----------------------------------------
# canonical_rows turns every known dataset shape into plain columns; a prompt is a text or a list of chat messages.
PRO_ROLES = {"<|prompter|>": "\n\nHuman: ", "<|assistant|>": "\n\nAssistant: "}


def pro_pairs(prefix, suffixes):
    """(prompt, response) of each candidate of a PRO / A-LoL row, or None when `prefix` does not fit `suffixes`.
    `prefix` holds one list of turns per candidate ("<|prompter|>…", "<|assistant|>…", …, a bare "<|assistant|>"),
    or one such list shared by all; joined with the role tokens made "\n\nHuman: " / "\n\nAssistant: " and the end
    stripped, as PRO's HH collator does, it is an HH prompt ending with "\n\nAssistant:", and the response is the
    suffix after one space (PRO joins prompt + " " + suffix; none added to a suffix that starts with whitespace).
    A plain-string prefix without role tokens (PRO's TL;DR files) is the prompt as it is, its suffix the response."""
    if prefix and all(isinstance(p, str) for p in prefix) and any(r in p for p in prefix for r in PRO_ROLES):
        prefix = [prefix] * len(suffixes)  # one list of turns for every candidate
    if len(prefix) != len(suffixes):
        return None
    pairs = []
    for turns, suffix in zip(prefix, map(str, suffixes)):
        text = "".join(turns) if isinstance(turns, (list, tuple)) else str(turns)
        if any(role in text for role in PRO_ROLES):
            for role, marker in PRO_ROLES.items():
                text = text.replace(role, marker)
            text = text.rstrip() if text.rstrip().endswith(HH_ASSISTANT) else text.rstrip() + HH_ASSISTANT
            suffix = suffix if suffix[:1].isspace() else " " + suffix
        pairs.append((text, suffix))
    return pairs


def pro_rankings(data, name: str):
    """(prompts, candidates, rewards) of PRO's rows {prefix, suffix, reward}, one ranking per row, its prompt and
    responses as pro_pairs joins them (common.load_rankings); a row whose prefix does not fit its suffixes fails
    with one line."""
    prompts = []
    candidates = []
    rewards = []
    for i, (prefix, suffixes, row_rewards) in enumerate(zip(data["prefix"], data["suffix"], data["reward"])):
        pairs = pro_pairs(prefix, suffixes)
        if pairs is None:
            fail(
                f"dataset '{name}' row {i}: its prefix does not fit its {len(suffixes)} suffixes; give one prefix, "
                f"or one per suffix"
            )
        prompts.append(pairs[0][0])
        candidates.append([response for _, response in pairs])
        rewards.append(row_rewards)
    return prompts, candidates, rewards


def _columns(rows: list, names: tuple) -> dict:
    """Row tuples as columns {name: list}; {} without rows."""
    if not rows:
        return {}
    return {name: list(column) for name, column in zip(names, zip(*rows))}


def canonical_rows(data, name: str) -> dict:
    """A dataset of a known shape as columns {prompt, response[, reward]} or {prompt, chosen, rejected}. Shapes:
    those two; rm-static's {prompt, response, chosen, rejected} (a preference row); HH transcripts {chosen, rejected}
    (split by split_hh; rows whose two dialogues differ before the last reply, or with an empty reply, are dropped
    and counted); TL;DR {prompt, label} (the summary is the response; "\nTL;DR:" appended to a prompt without it);
    PRO's preprocessed HH files, as A-LoL reuses them, {prefix, suffix, reward[, sft_index, meta]} with one reward
    per suffix: one {prompt, response, reward} row per suffix (pro_pairs; the reward as stored, a raw reward-model
    logit in PRO's files; rows whose prefix, suffix and reward lists differ in length are dropped and counted, and
    so are blank suffixes)."""
    cols = set(data.column_names)
    report = os.environ.get("RANK", "0") == "0"  # notes on dropped rows: rank 0 only
    if "messages" in cols and "prompt" not in cols:
        conversations = [split_messages(messages) for messages in data["messages"]]
        prompts = [prompt for prompt, _ in conversations]
        replies = [reply for _, reply in conversations]
        if not all(replies):  # prompts only: each conversation without a trailing assistant reply
            return {"prompt": prompts}
        rows = {"prompt": prompts, "response": replies}
        if "reward" in cols:
            rows["reward"] = data["reward"]
        return rows
    if {"prefix", "suffix", "reward"} <= cols and "prompt" not in cols:
        kept = []
        ragged = 0
        blank = 0
        for prefix, suffixes, rewards in zip(data["prefix"], data["suffix"], data["reward"]):
            pairs = pro_pairs(prefix, suffixes) if len(suffixes) == len(rewards) else None
            if pairs is None:
                ragged += 1
                continue
            rows = [(prompt, response, float(r)) for (prompt, response), r in zip(pairs, rewards)]
            kept += [row for row in rows if row[1].strip()]
            blank += sum(not row[1].strip() for row in rows)
        if (ragged or blank) and report:
            note(
                f"{ragged} of {len(data)} PRO rows of '{name}' dropped: their prefix, suffix and reward "
                f"lists differ in length; {blank} blank suffixes dropped"
            )
        return _columns(kept, ("prompt", "response", "reward"))
    if {"chosen", "rejected"} <= cols and "prompt" not in cols:
        split = split_messages if len(data) and isinstance(data[0]["chosen"], list) else split_hh  # chat or HH text
        pairs = [(split(c), split(r)) for c, r in zip(data["chosen"], data["rejected"])]
        kept = [(p, c, r) for (p, c), (q, r) in pairs if p and p == q and c and c.strip() and r and r.strip()]
        if len(kept) < len(data) and report:
            note(
                f"{len(data) - len(kept)} of {len(data)} HH rows of '{name}' dropped: no shared prompt before "
                f"the last assistant reply, or an empty reply"
            )
        return _columns(kept, ("prompt", "chosen", "rejected"))
    if {"prompt", "chosen", "rejected"} <= cols:
        return {k: [str(v) for v in data[k]] for k in ("prompt", "chosen", "rejected")}
    if {"prompt", "label"} <= cols and "response" not in cols:
        prompts = [p if p.rstrip().endswith("TL;DR:") else p + "\nTL;DR:" for p in map(str, data["prompt"])]
        return {"prompt": prompts, "response": [str(v) for v in data["label"]]}
    return {k: data[k] for k in ("prompt", "response", "reward") if k in cols}


# ---- Chat messages: HH transcripts and [{role, content}] lists, one read as the other --------------------------------
HH_ASSISTANT = "\n\nAssistant:"


def split_hh(dialogue: str):
    """An Anthropic HH transcript ("\n\nHuman: …\n\nAssistant: …") -> (prompt, reply), cut at the LAST
    "\n\nAssistant:": the prompt ends with it (the policy continues from there); (None, dialogue) without one."""
    cut = dialogue.rfind(HH_ASSISTANT) + len(HH_ASSISTANT)
    if cut < len(HH_ASSISTANT):  # rfind found no marker
        return None, dialogue
    return dialogue[:cut], dialogue[cut:]


def hh_turns(prompt: str):
    """An HH prompt ("\n\nHuman: …\n\nAssistant: …\n\nAssistant:") as [(role, text)], role user / assistant, each text
    stripped; the open "Assistant:" the policy answers is dropped. Text without HH markers is one user turn."""
    parts = re.split(r"(?:^|\n\n)(Human|Assistant):", prompt)
    turns = [("user", parts[0].strip())] if parts[0].strip() else []
    for marker, text in zip(parts[1::2], parts[2::2]):
        turns.append(("user" if marker == "Human" else "assistant", text.strip()))
    if turns and turns[-1][0] == "assistant" and not turns[-1][1]:
        turns.pop()
    return turns


def prompt_messages(prompt) -> list:
    """A prompt as chat messages [{role, content}]: a `messages` prompt as it is; an HH prompt as alternating user /
    assistant turns (hh_turns); any other text as one user message."""
    if isinstance(prompt, str):
        return [{"role": role, "content": text} for role, text in hh_turns(prompt)]
    return [dict(m) for m in prompt]


def prompt_text(prompt) -> str:
    """A prompt as plain text: a text as it is; `messages` as an HH transcript ending with the open "Assistant:" (a
    system message first, as plain text), for a reward model or function that reads text without a template."""
    if isinstance(prompt, str):
        return prompt
    marker = {"user": "\n\nHuman: ", "assistant": "\n\nAssistant: ", "system": ""}
    return "".join(marker.get(m["role"], f"\n\n{m['role']}: ") + m["content"] for m in prompt) + HH_ASSISTANT


def split_messages(messages):
    """A conversation [{role, content}, …] -> (prompt messages, the last assistant reply, or None without one)."""
    messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]["content"]
    return messages, None


# ---- Chat prompts in a token budget: whole turns dropped from the start, never a message cut -------------------------
def _turn_starts(prompt):
    """A chat prompt as (system message or [], the other messages, where a kept tail may start: 0 and each later user
    turn, the last one last)."""
    messages = prompt_messages(prompt)
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    return system, turns, [0] + [k for k, message in enumerate(turns) if k and message["role"] == "user"]


def _chat_ids(tokenizer, messages) -> list:
    """The template's rendering of `messages` with the assistant turn opened, as token ids (no BOS added: a template
    writes its own)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def fit_chat_prompt(tokenizer, prompt, budget: int):
    """Token ids of a chat prompt rendered with the template (assistant turn opened) in at most `budget` tokens, by
    dropping whole turns from the start: a leading system message stays, and the kept turns start at a user turn,
    the earliest that fits; never a message cut. None when even the last user turn (with the system message and the
    opened assistant turn) does not fit."""
    system, turns, starts = _turn_starts(prompt)
    best = _chat_ids(tokenizer, system + turns[starts[-1] :])
    if len(best) > budget:
        return None
    low = 0  # a binary search over the starts: a tail's length grows with each earlier turn it takes
    high = len(starts) - 1  # the earliest start known to fit
    while low < high:
        middle = (low + high) // 2
        ids = _chat_ids(tokenizer, system + turns[starts[middle] :])
        if len(ids) <= budget:
            high = middle
            best = ids
        else:
            low = middle + 1
    return best


def fitting_prompts(
    tokenizer, prompts, *, max_prompt_length, max_new_tokens, context, chat_template=False, what="prompts", need=1
) -> list:
    """The indices of the prompts that encode_prompts can fit: all of them for plain text (cut on the left); under
    --chat-template those whose last user turn (with any system message and the opened assistant turn) fits. Callers
    keep these rows of every column (prompts, responses, rewards), so that rows stay aligned. The dropped ones are
    counted in one note (rank 0); fewer than `need` left is one error line naming --max-prompt-length."""
    if not chat_template:
        return list(range(len(prompts)))
    budget = prompt_budget(max_prompt_length, max_new_tokens, context)
    render_prompts(tokenizer, [], chat_template)  # a tokenizer without a template: its one-line error
    tails = []  # each prompt's shortest form: the system message, the last user turn on
    for prompt in prompts:
        system, turns, starts = _turn_starts(prompt)
        tails.append(
            tokenizer.apply_chat_template(system + turns[starts[-1] :], tokenize=False, add_generation_prompt=True)
        )
    lengths = [len(row) for row in tokenizer(tails, add_special_tokens=False)["input_ids"]]
    kept = [i for i, length in enumerate(lengths) if length <= budget]
    dropped = len(prompts) - len(kept)
    if len(kept) < need:
        fail(
            f"{len(kept)} of the {len(prompts)} {what} fit the prompt budget of {budget} tokens even as their last "
            f"user turn (with the system message), and the run needs {need}; raise --max-prompt-length"
        )
    if dropped:
        note(
            f"{dropped} of {len(prompts)} {what} dropped: their last user turn (with the system message) is "
            f"longer than the prompt budget of {budget} tokens (--max-prompt-length {max_prompt_length})"
        )
    return kept
