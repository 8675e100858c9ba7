"""Chat templates: prompts rendered with the policy tokenizer's template (--chat-template), HH dialogues as messages, a
`messages` column, and reward models that score their own template of (prompt, response). On GPT-2's real BPE
(../shared/data/tokenizers/gpt2) with Qwen2's and Llama 3's special tokens added, as instruct checkpoints have them."""

import json

import pytest
import torch
from conftest import ROOT, train_bpe

GPT2_DIR = ROOT.parent / "shared" / "data" / "tokenizers" / "gpt2"
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
HH = "\n\nHuman: What is a good film?\n\nAssistant: Try Alien.\n\nHuman: Why that one?\n\nAssistant:"
HH_MESSAGES = [
    {"role": "user", "content": "What is a good film?"},
    {"role": "assistant", "content": "Try Alien."},
    {"role": "user", "content": "Why that one?"},
]


def qwen_tokenizer():
    """GPT-2's BPE with Qwen2 instruct's turn tokens, EOS <|im_end|> and its ChatML template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(GPT2_DIR)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token, tok.pad_token, tok.chat_template = "<|im_end|>", "<|endoftext|>", CHATML
    tok.padding_side = "left"
    return tok


def llama3_tokenizer():
    """GPT-2's BPE with Llama 3's layout: <|begin_of_text|> before every text, and a template that writes it too."""
    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    gpt2 = AutoTokenizer.from_pretrained(GPT2_DIR)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(gpt2.backend_tokenizer.to_str()),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"]})
    tok.backend_tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.bos_token_id)]
            ),
        ]
    )
    tok.chat_template = LLAMA3
    return tok


def test_prompts_become_chat_messages():
    import common
    import formats

    assert common.prompt_messages(HH) == HH_MESSAGES
    assert common.prompt_messages("Summarize: the cat sat.\nTL;DR:") == [
        {"role": "user", "content": "Summarize: the cat sat.\nTL;DR:"}
    ]
    system = [{"role": "system", "content": "Be brief."}, *HH_MESSAGES]
    assert common.prompt_messages(system) == system
    # messages as plain text for a reward without a template: an HH transcript that reads back as the same turns
    assert common.prompt_text(HH_MESSAGES) == HH
    assert common.prompt_messages(common.prompt_text(HH_MESSAGES)) == HH_MESSAGES
    assert common.prompt_text(system).startswith("Be brief.\n\nHuman: ")
    assert formats.split_messages([*HH_MESSAGES, {"role": "assistant", "content": "It is tense."}]) == (
        HH_MESSAGES,
        "It is tense.",
    )
    assert formats.split_messages(HH_MESSAGES) == (HH_MESSAGES, None)


@pytest.mark.parametrize("kind", ["qwen", "llama3"])
def test_encode_prompts_renders_the_template_with_the_assistant_turn_opened(kind):
    import common

    tok = qwen_tokenizer() if kind == "qwen" else llama3_tokenizer()
    (row,), n_truncated = common.encode_prompts(tok, [HH], 512, 16, 1024, chat_template=True)
    text = tok.apply_chat_template(HH_MESSAGES, tokenize=False, add_generation_prompt=True)
    assert n_truncated == 0 and row == tok(text, add_special_tokens=False)["input_ids"]
    opened = "<|im_start|>assistant\n" if kind == "qwen" else "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert tok.decode(row).endswith(opened) and "Human:" not in tok.decode(row)
    if kind == "llama3":  # the template writes BOS; the tokenizer must not add a second one
        assert row[0] == tok.bos_token_id and row.count(tok.bos_token_id) == 1
    # too long: the first turns go whole (the BOS the template writes stays first), never part of a message
    last = tok(tok.apply_chat_template(HH_MESSAGES[2:], tokenize=False, add_generation_prompt=True))["input_ids"]
    last = last[1:] if kind == "llama3" else last  # the tokenizer's own BOS before the one the template wrote
    (cut,), n_truncated = common.encode_prompts(tok, [HH], len(last), 16, 1024, chat_template=True)
    assert n_truncated == 1 and cut == last and len(cut) < len(row)
    # without the flag the prompt stays raw text, as the tokenizer encodes it
    (raw,), _ = common.encode_prompts(tok, [HH], 512, 16, 1024)
    assert raw == tok(HH)["input_ids"]


def parse_rendered(tok, kind, row) -> list:
    """A rendered prompt's token ids back to messages, split on the template's markers; fails unless the text is
    whole messages (each opened and closed) followed by the opened assistant turn."""
    text = tok.decode(row, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if kind == "qwen":
        start, head, end, opened = "", "<|im_start|>", "<|im_end|>\n", "<|im_start|>assistant\n"
    else:
        start, head, end = "<|begin_of_text|>", "<|start_header_id|>", "<|eot_id|>"
        opened = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert text.startswith(start + head) and text.endswith(opened), text
    messages = []
    for chunk in text[len(start) : -len(opened)].split(head)[1:]:
        assert chunk.endswith(end), text
        role, content = chunk[: -len(end)].split("\n" if kind == "qwen" else "<|end_header_id|>\n\n", 1)
        messages.append({"role": role, "content": content})
    return messages


def conversations(n: int, seed: int) -> list:
    """Chat prompts of 1 to 4 exchanges (user first, a user turn last), half with a system message, each message 1
    to 30 words long."""
    import random

    rng = random.Random(seed)
    words = "the film was slow but its cast and score kept me watching until a late twist".split()
    prompts = []
    for _ in range(n):
        turns = 2 * rng.randint(0, 3) + 1
        messages = [{"role": "system", "content": "Be brief."}] if rng.random() < 0.5 else []
        for k in range(turns):
            content = " ".join(rng.choice(words) for _ in range(rng.randint(1, 30)))
            messages.append({"role": "user" if k % 2 == 0 else "assistant", "content": content.capitalize()})
        prompts.append(messages)
    return prompts


@pytest.mark.parametrize("kind", ["qwen", "llama3"])
def test_chat_prompts_fit_by_whole_turns(kind, capsys):
    """Real HH prompts and conversations with a system message, under three prompt budgets: every prompt the
    policy gets parses back into whole messages, the system message first, then the original's last turns from a
    user turn on, as many as fit (one more earlier exchange would not); a prompt whose last user turn cannot fit is
    dropped, counted in one note, as often as a loop over the prompts expects."""
    import common

    tok = qwen_tokenizer() if kind == "qwen" else llama3_tokenizer()
    hh = common.load_prompts(str(ROOT.parent / "shared/data/hh-rlhf/helpful-base-test.jsonl.gz"), "train[:40]")
    prompts = hh + conversations(40, seed=1)

    def length(messages):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    seen = []  # (dropped, shortened) at each budget
    for budget in (24, 40, 96):
        encode = dict(max_prompt_length=budget, max_new_tokens=16, context=1024, chat_template=True)
        kept = common.fitting_prompts(tok, prompts, what="evaluation prompts", **encode)
        rows, n_truncated = common.encode_prompts(tok, [prompts[i] for i in kept], **encode)
        expected_kept = []
        expected_truncated = 0
        for i, prompt in enumerate(prompts):
            messages = common.prompt_messages(prompt)
            system = messages[:1] if messages[0]["role"] == "system" else []
            turns = messages[len(system) :]
            last_user = max(k for k, m in enumerate(turns) if m["role"] == "user")
            if length(system + turns[last_user:]) <= budget:
                expected_kept.append(i)
                expected_truncated += length(messages) > budget
        assert kept == expected_kept and n_truncated == expected_truncated
        dropped = len(prompts) - len(kept)
        notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
        assert len(notes) == (1 if dropped else 0), notes
        assert all(note.startswith(f"note: {dropped} of {len(prompts)} evaluation prompts dropped") for note in notes)
        seen.append((dropped, n_truncated))
        for i, row in zip(kept, rows):
            original = common.prompt_messages(prompts[i])
            system = original[:1] if original[0]["role"] == "system" else []
            turns = original[len(system) :]
            parsed = parse_rendered(tok, kind, row)
            assert len(row) <= budget and parsed[: len(system)] == system  # the system message kept
            tail = parsed[len(system) :]
            start = len(turns) - len(tail)
            assert tail and tail == turns[start:] and tail[0]["role"] == "user"  # whole messages, the last turns
            assert all(message in original for message in parsed)
            earlier = [k for k in range(start) if turns[k]["role"] == "user"]
            assert not earlier or length(system + turns[earlier[-1] :]) > budget  # as many turns as fit
    assert all(0 < dropped < len(prompts) for dropped, _ in seen[:2]) and all(shortened for _, shortened in seen), seen


def test_plain_text_is_cut_on_the_left_and_dropped_chat_rows_stay_aligned(tmp_path):
    """Plain text keeps the left cut (never dropped); chat rows that cannot fit leave every column together; a set
    where no chat prompt fits, or an unfitted one handed to encode_prompts, is one error line."""
    import common

    tok = qwen_tokenizer()
    encode = dict(max_prompt_length=20, max_new_tokens=16, context=1024)
    long = HH * 4
    assert common.fitting_prompts(tok, [long, HH], **encode) == [0, 1]
    (cut, short), n_truncated = common.encode_prompts(tok, [long, HH], **encode)
    assert cut == tok(long)["input_ids"][-20:] and short == tok(HH)["input_ids"][-20:] and n_truncated == 2
    wordy = [{"role": "user", "content": "Why? " * 40}]
    rows = tmp_path / "rows.jsonl"  # scored chat rows: the middle one's only user turn is too long
    rows.write_text(
        "".join(
            json.dumps({"messages": [*m, {"role": "assistant", "content": f"reply {i}"}], "reward": i}) + "\n"
            for i, m in enumerate((HH_MESSAGES, wordy, HH_MESSAGES[:1]))
        )
    )
    prompts, responses, rewards = common.load_offline_rows(str(rows))
    chat = dict(encode, max_prompt_length=48, chat_template=True)
    kept = common.fitting_prompts(tok, prompts, what="offline rows", **chat)
    assert common.rows_at(kept, prompts, responses, rewards) == [
        [HH_MESSAGES, HH_MESSAGES[:1]],
        ["reply 0", "reply 2"],
        [0.0, 2.0],
    ]
    for call in (
        lambda: common.fitting_prompts(tok, [wordy, wordy], what="evaluation prompts", **chat),
        lambda: common.encode_offline_rows(tok, prompts, responses, **chat),
    ):
        with pytest.raises(SystemExit) as stop:
            call()
        message = str(stop.value)
        assert message.startswith("error:") and "\n" not in message and "--max-prompt-length" in message, message


def test_chat_template_errors_are_one_line():
    """A tokenizer without a template under --chat-template, and chat messages without it: one line naming the fix."""
    from transformers import AutoTokenizer

    import common

    gpt2 = AutoTokenizer.from_pretrained(GPT2_DIR)
    for tok, prompts, flag, fix in (
        (gpt2, [HH], True, "drop --chat-template"),
        (qwen_tokenizer(), [HH_MESSAGES], False, "pass --chat-template"),
    ):
        with pytest.raises(SystemExit) as stop:
            common.encode_prompts(tok, prompts, 64, 8, 1024, chat_template=flag)
        message = str(stop.value)
        assert message.startswith("error:") and "\n" not in message and fix in message, message


def test_a_messages_column_gives_prompts_rows_and_preference_pairs(tmp_path):
    import common

    reply = {"role": "assistant", "content": "It is tense."}
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (HH_MESSAGES, HH_MESSAGES[:1])))
    assert common.load_prompts(str(prompts), "train") == [HH_MESSAGES, HH_MESSAGES[:1]]
    rows = tmp_path / "rows.jsonl"  # {messages, reward}: the last assistant message is the response
    rows.write_text(json.dumps({"messages": [*HH_MESSAGES, reply], "reward": 0.5}) + "\n")
    assert common.load_offline_rows(str(rows)) == ([HH_MESSAGES], ["It is tense."], [0.5])
    pairs = tmp_path / "pairs.jsonl"  # conversational preference rows: chosen / rejected conversations
    pairs.write_text(
        json.dumps(
            {"chosen": [*HH_MESSAGES, reply], "rejected": [*HH_MESSAGES, {"role": "assistant", "content": "No idea."}]}
        )
        + "\n"
    )
    assert common.load_offline_rows(str(pairs)) == ([HH_MESSAGES] * 2, ["It is tense.", "No idea."], [1.0, 0.0])


def policy_batch(tok, prompts, responses):
    """The policy's batch as the scripts hold it: rendered prompts LEFT-padded, responses + EOS RIGHT-padded."""
    import common

    rows, _ = common.encode_prompts(tok, prompts, 512, 16, 1024, chat_template=True)
    query_ids, query_mask = common.pad_left(rows, tok.pad_token_id)
    ids = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in responses]
    width = max(map(len, ids))
    response_ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in ids])
    response_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids])
    return query_ids, query_mask, response_ids, response_mask


def test_a_reward_model_with_its_own_template_scores_its_rendering(tmp_path):
    """The reward model has another tokenizer and another template than the policy: it must read its own template
    of (prompt messages, response), not the policy's ChatML ids decoded, and a prompt given as HH text or as
    messages must score the same."""
    from transformers import AutoModelForSequenceClassification, GPTNeoXConfig, GPTNeoXForSequenceClassification

    import common

    template = (
        "{% for message in messages %}{{ '[' + message['role'] + '] ' + message['content'] + '<|endoftext|>' }}"
        "{% endfor %}"
    )
    rm_tok = train_bpe([HH, "It is tense. No idea. A classic of the genre."] * 4, vocab_size=300)
    rm_tok.chat_template = template
    torch.manual_seed(0)
    model = GPTNeoXForSequenceClassification(
        GPTNeoXConfig(
            vocab_size=len(rm_tok),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_labels=1,
            max_position_embeddings=512,
            pad_token_id=rm_tok.pad_token_id,
        )
    )
    model.save_pretrained(tmp_path / "rm")
    rm_tok.save_pretrained(tmp_path / "rm")
    tok = qwen_tokenizer()
    responses = [" It is tense.", "No idea.", "A classic of the genre."]
    prompts = [HH, HH_MESSAGES, HH_MESSAGES[:1]]
    batch = policy_batch(tok, prompts, responses)
    score = common.load_reward(str(tmp_path / "rm"), tok)
    got = score(*batch, prompts)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    expected = []
    for prompt, response in zip(prompts, responses):
        messages = common.prompt_messages(prompt) + [{"role": "assistant", "content": response}]
        text = rm_tok.apply_chat_template(messages, tokenize=False)
        assert text.startswith("[user] What is a good film?<|endoftext|>")
        with torch.no_grad():
            expected.append(model(**rm_tok(text, return_tensors="pt")).logits[0, 0].item())
    assert got.tolist() == pytest.approx(expected, abs=1e-5)
    assert got[0].item() == pytest.approx(
        score(*policy_batch(tok, [HH_MESSAGES], responses[:1]), [HH]).item(), abs=1e-6
    )  # HH text and messages: one rendering
    assert len(set(expected)) == 3


def test_a_reward_function_gets_the_prompts_as_given(tmp_path, monkeypatch):
    import common

    (tmp_path / "chat_rewards.py").write_text(
        "CALLS = []\n"
        "def spy(prompts, responses):\n"
        "    CALLS.append((prompts, responses))\n"
        "    return [float(len(r)) for r in responses]\n"
    )
    monkeypatch.chdir(tmp_path)
    tok = qwen_tokenizer()
    prompts, responses = [HH_MESSAGES, HH], [" It is tense.", "No idea."]
    score = common.load_reward("chat_rewards:spy", tok)
    assert score(*policy_batch(tok, prompts, responses), prompts).tolist() == [13.0, 8.0]
    import chat_rewards

    assert [(prompts, responses)] == chat_rewards.CALLS  # the messages and the text as the dataset gave them
