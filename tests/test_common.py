"""Unit tests of common.py: log-prob / value gathering against per-row loops, EOS truncation, masked statistics,
the built-in gold score, prompt encoding, the loaders' one-line errors, the caches and their content keys, distinct-n.
CPU, offline, fast."""

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT

import common

VOCAB = 64
PAD_ID = 0


# ------------------------------------------------------------------------------------------------------------
# Helpers: a tiny random GPT-2, a ragged (left-padded prompt | right-padded response) batch, a word tokenizer.
# ------------------------------------------------------------------------------------------------------------
def tiny_config(**extra):
    from transformers import GPT2Config

    # initializer_range 0.3 (instead of 0.02) so that log-probs / values vary by O(1) between tokens and positions:
    # an off-by-one shift or a wrong position id then moves the result far beyond the tolerance.
    return GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2, initializer_range=0.3, **extra)


def tiny_causal_lm(seed=0):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(tiny_config()).eval()


def tiny_score_model(seed=0):
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(seed)
    return GPT2ForSequenceClassification(tiny_config(num_labels=1, pad_token_id=PAD_ID)).eval()


PROMPT_LENS = [3, 6, 1, 4]
RESPONSE_LENS = [5, 2, 7, 1]


def ragged_batch(seed=0):
    """Rows of real tokens (ids 1..VOCAB-1) plus the padded batch. Padding slots hold GARBAGE ids (not PAD_ID):
    the attention mask, not the token id, decides what is padding."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENS]
    responses = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in RESPONSE_LENS]
    P, R = max(PROMPT_LENS), max(RESPONSE_LENS)
    query_ids = torch.randint(1, VOCAB, (len(prompts), P), generator=g)
    response_ids = torch.randint(1, VOCAB, (len(prompts), R), generator=g)
    query_mask = torch.zeros(len(prompts), P, dtype=torch.long)
    response_mask = torch.zeros(len(prompts), R, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        query_ids[i, P - len(p) :] = torch.tensor(p)
        query_mask[i, P - len(p) :] = 1
        response_ids[i, : len(r)] = torch.tensor(r)
        response_mask[i, : len(r)] = 1
    return prompts, responses, query_ids, query_mask, response_ids, response_mask


def word_tokenizer(words=("a", "b", "c", "d", "e", "f", "g", "h"), pad=True):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = (["<pad>"] if pad else []) + ["<eos>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + list(words))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = dict(pad_token="<pad>") if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>", **kwargs)


# ------------------------------------------------------------------------------------------------------------
# forward_logprobs / forward_values against unbatched, unpadded per-row loops
# ------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def loop_logprobs_entropy(model, prompts, responses, temperature):
    out = []
    for p, r in zip(prompts, responses):
        ids = torch.tensor([p + r])
        logits = model(input_ids=ids).logits[0].double() / temperature
        logits = logits[len(p) - 1 : len(p) + len(r) - 1]  # the state before each response token
        logp = F.log_softmax(logits, -1)
        out.append(
            (
                [logp[t, tok].item() for t, tok in enumerate(r)],
                [-(logp[t].exp() * logp[t]).sum().item() for t in range(len(r))],
            )
        )
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward_logprobs_and_entropy_match_unpadded_per_row_loop(temperature):
    model = tiny_causal_lm()
    prompts, responses, q, qm, r, rm = ragged_batch()
    with torch.no_grad():
        logprobs_only = common.forward_logprobs(model, q, qm, r, rm, temperature=temperature)
        logprobs, entropy = common.forward_logprobs(model, q, qm, r, rm, temperature=temperature, with_entropy=True)
    assert logprobs.shape == entropy.shape == r.shape
    torch.testing.assert_close(logprobs_only, logprobs, rtol=0, atol=0)
    expected = loop_logprobs_entropy(model, prompts, responses, temperature)
    values_seen = []
    for i, (exp_lp, exp_ent) in enumerate(expected):
        n = len(responses[i])
        assert logprobs[i, :n].tolist() == pytest.approx(exp_lp, abs=1e-5)
        assert entropy[i, :n].tolist() == pytest.approx(exp_ent, abs=1e-5)
        assert logprobs[i, n:].tolist() == [0.0] * (r.shape[1] - n)  # padding exactly 0
        values_seen += exp_lp
    # the check has teeth: log-probs differ between tokens by far more than the tolerance
    assert max(values_seen) - min(values_seen) > 0.5


def test_forward_logprobs_runs_the_lm_head_on_the_response_positions_only():
    """The LM head never sees a prompt position but the last: with a real vocabulary, prompt × vocabulary logits are
    the largest tensor of a forward pass. The head is wrapped to record how many positions each call gets."""
    model = tiny_causal_lm()
    _prompts, _, q, qm, r, rm = ragged_batch()
    seen = []
    model.lm_head.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[1]))
    with torch.no_grad():
        common.forward_logprobs(model, q, qm, r, rm, with_entropy=True)
    assert seen == [r.shape[1] + 1] and q.shape[1] > 2, (seen, q.shape)


@pytest.mark.parametrize("size", [1, 3, 5])
def test_chunked_scoring_gives_the_one_pass_result(size):
    """--forward-batch-size: log-probs, values and a reward function's scores over chunks of rows (the last one short)
    are those of one pass over the whole ragged batch."""
    model, value_model = tiny_causal_lm(), tiny_score_model()
    _prompts, _, q, qm, r, rm = ragged_batch()
    assert len(q) % size or size == 1  # a short last chunk where the size allows
    with torch.no_grad():
        whole = common.forward_logprobs(model, q, qm, r, rm)
        chunked = common.in_chunks(lambda *rows: common.forward_logprobs(model, *rows), (q, qm, r, rm), size)
        torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
        whole = common.forward_values(value_model, q, qm, r, rm)
        chunked = common.in_chunks(lambda *rows: common.forward_values(value_model, *rows), (q, qm, r, rm), size)
        torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    calls, texts = [], [f"prompt {i}" for i in range(len(q))]

    def score(query_ids, query_mask, response_ids, response_mask, prompts):  # a reward: the response's length
        calls.append(prompts)
        return response_mask.sum(1).float()

    assert common.in_chunks(score, (q, qm, r, rm, texts), size).tolist() == rm.sum(1).float().tolist()
    assert [len(c) for c in calls] == [min(size, len(q) - i) for i in range(0, len(q), size)]
    assert [text for call in calls for text in call] == texts


def test_entropy_has_a_graph_only_when_it_is_trained_on():
    """PPO's entropy bonus needs the entropy's gradient only when --entropy-coef is not 0; without it the [batch, len,
    vocabulary] softmax is not kept for backward, and the values are the same."""
    model = tiny_causal_lm()
    _, _, q, qm, r, rm = ragged_batch()
    logprobs, trained = common.forward_logprobs(model, q, qm, r, rm, with_entropy=True)
    logprobs_2, logged = common.forward_logprobs(model, q, qm, r, rm, with_entropy=True, entropy_grad=False)
    assert trained.requires_grad and logprobs.requires_grad and logprobs_2.requires_grad
    assert not logged.requires_grad
    torch.testing.assert_close(trained.detach(), logged, rtol=0, atol=0)


def test_forward_logprobs_temperature_changes_the_result():
    """Temperature is applied to the logits (not ignored): T=0.5 must differ from T=1 on the same batch."""
    model = tiny_causal_lm()
    _, _, q, qm, r, rm = ragged_batch()
    with torch.no_grad():
        a = common.forward_logprobs(model, q, qm, r, rm, temperature=1.0)
        b = common.forward_logprobs(model, q, qm, r, rm, temperature=0.5)
    assert (a - b).abs()[rm.bool()].max() > 1e-2


def test_forward_logprobs_is_independent_of_how_much_padding_there_is():
    """The same row alone (no padding) and inside a ragged batch gives the same log-probs."""
    model = tiny_causal_lm()
    prompts, responses, q, qm, r, rm = ragged_batch()
    with torch.no_grad():
        batched = common.forward_logprobs(model, q, qm, r, rm)
        for i, (p, resp) in enumerate(zip(prompts, responses)):
            alone = common.forward_logprobs(
                model,
                torch.tensor([p]),
                torch.ones(1, len(p), dtype=torch.long),
                torch.tensor([resp]),
                torch.ones(1, len(resp), dtype=torch.long),
            )
            torch.testing.assert_close(batched[i, : len(resp)], alone[0], rtol=0, atol=1e-5)


def test_forward_values_match_unpadded_per_row_loop():
    model = tiny_score_model()
    prompts, responses, q, qm, r, rm = ragged_batch(seed=1)
    with torch.no_grad():
        values = common.forward_values(model, q, qm, r, rm)
        assert values.shape == r.shape
        seen = []
        for i, (p, resp) in enumerate(zip(prompts, responses)):
            hidden = model.transformer(input_ids=torch.tensor([p + resp])).last_hidden_state
            per_token = model.score(hidden)[0, :, 0]
            expected = per_token[len(p) - 1 : len(p) + len(resp) - 1].tolist()  # V(x + y_<t) for each t
            assert values[i, : len(resp)].tolist() == pytest.approx(expected, abs=1e-5)
            assert values[i, len(resp) :].tolist() == [0.0] * (r.shape[1] - len(resp))
            seen += expected
    assert max(seen) - min(seen) > 0.1


# ------------------------------------------------------------------------------------------------------------
# truncate_after_eos
# ------------------------------------------------------------------------------------------------------------
def test_truncate_after_eos_crafted_rows():
    EOS, PAD = 1, 0
    rows = [
        [5, EOS, 7, 8, 9],  # EOS in the middle
        [EOS, 5, 6, 7, 8],  # EOS first
        [5, 6, 7, 8, EOS],  # EOS last
        [5, 6, 7, 8, 9],  # no EOS
        [5, EOS, EOS, 9, EOS],
    ]  # EOS twice in a row (and once more later)
    ids, mask, ended = common.truncate_after_eos(torch.tensor(rows), EOS, PAD)
    assert ids.tolist() == [
        [5, EOS, PAD, PAD, PAD],
        [EOS, PAD, PAD, PAD, PAD],
        [5, 6, 7, 8, EOS],
        [5, 6, 7, 8, 9],
        [5, EOS, PAD, PAD, PAD],
    ]
    assert mask.tolist() == [[1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert ended.tolist() == [True, True, True, False, True]


def test_stop_strings_cut_real_bpe_text_before_the_next_turn():
    """HH's stop strings on GPT-2 BPE text (../shared): the response is cut to the tokens before "Human:" /
    "Assistant:", counts as ended, and EOS still cuts first."""
    from transformers import AutoTokenizer

    path = ROOT.parent / "shared" / "data" / "tokenizers" / "gpt2"
    assert (path / "tokenizer.json").exists(), f"missing {path}: the test needs ../shared beside the project"
    tok = AutoTokenizer.from_pretrained(path)
    texts = [
        " Sure, here it is.\n\nHuman: thanks",
        " No stop here at all",
        " Fine.\n\nAssistant: again",
        "Human: at once",
    ]
    rows = [tok.encode(t) for t in texts]
    eos = tok.eos_token_id
    rows[1] = rows[1][:3] + [eos] + rows[1][3:]  # EOS before any stop string: EOS cuts
    width = max(map(len, rows))
    ids = torch.tensor([r + [eos] * (width - len(r)) for r in rows])
    ids, mask, ended = common.truncate_after_eos(ids, eos, eos, tok, ["Human:", "Assistant:"])
    kept = [tok.decode(r[m.bool()]) for r, m in zip(ids, mask)]
    assert kept[0] == " Sure, here it is.\n\n" and kept[2] == " Fine.\n\n"  # "\n" tokens precede "Human" / "Assistant"
    assert kept[1] == tok.decode(rows[1][:4])  # up to and including the EOS
    assert kept[3] == "Human"  # a stop string at the very start: one token is kept, never an empty row
    assert ended.tolist() == [True, True, True, True]
    unchanged = common.truncate_after_eos(torch.tensor([tok.encode(" a b")]), eos, eos, tok, ["Human:"])
    assert unchanged[1].tolist() == [[1, 1]] and unchanged[2].tolist() == [False]


def test_truncate_after_eos_when_pad_is_eos():
    """GPT-2 style: pad id == EOS id (generate pads finished rows with EOS); only the first EOS counts."""
    EOS = PAD = 3
    ids, mask, ended = common.truncate_after_eos(torch.tensor([[7, EOS, EOS, EOS], [7, 8, 9, 10]]), EOS, PAD)
    assert ids.tolist() == [[7, EOS, EOS, EOS], [7, 8, 9, 10]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert ended.tolist() == [True, False]


# ------------------------------------------------------------------------------------------------------------
# masked statistics
# ------------------------------------------------------------------------------------------------------------
def ragged_values(seed=0, padding_value=1e6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lengths = [6, 2, 5, 1]
    x = torch.randn(len(lengths), 6, generator=g, dtype=dtype) * 3 + 1.5
    mask = torch.zeros(len(lengths), 6, dtype=dtype)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    x = torch.where(mask.bool(), x, torch.full_like(x, padding_value))
    return x, mask


@pytest.mark.parametrize("padding_value", [1e6, -1e6, 0.0])
def test_masked_mean_and_var_ignore_padding(padding_value):
    x, mask = ragged_values(padding_value=padding_value)
    selected = x[mask.bool()]
    assert len(selected) == 14
    expected_mean = sum(selected.tolist()) / len(selected)
    expected_var = sum((v - expected_mean) ** 2 for v in selected.tolist()) / len(selected)  # population variance
    assert common.masked_mean(x, mask).item() == pytest.approx(expected_mean, rel=1e-12)
    assert common.masked_mean((x - expected_mean) ** 2, mask).item() == pytest.approx(expected_var, rel=1e-9)
    # a long / bool mask gives the same
    assert common.masked_mean(x, mask.long()).item() == pytest.approx(expected_mean, rel=1e-12)
    assert common.masked_mean(x, mask.bool()).item() == pytest.approx(expected_mean, rel=1e-12)


def test_masked_mean_gradient_is_zero_on_padding_and_empty_mask_gives_zero():
    x, mask = ragged_values(padding_value=1e6)
    x.requires_grad_(True)
    common.masked_mean(x, mask).backward()
    assert torch.equal(x.grad, mask / mask.sum())
    assert common.masked_mean(torch.full((2, 3), 1e6), torch.zeros(2, 3)).item() == 0.0


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_masked_over_selected_entries_only(shift_mean):
    x, mask = ragged_values(padding_value=1e6)
    out = common.whiten_masked(x, mask, shift_mean=shift_mean)
    selected = x[mask.bool()]
    mean, var = selected.mean(), selected.var(unbiased=False)
    expected = (selected - mean) / torch.sqrt(var + 1e-8)
    if not shift_mean:
        expected = expected + mean
    torch.testing.assert_close(out[mask.bool()], expected, rtol=1e-10, atol=1e-10)
    assert out[~mask.bool()].tolist() == [0.0] * int((1 - mask).sum())  # padding stays 0
    if shift_mean:
        w = out[mask.bool()]
        assert w.mean().item() == pytest.approx(0.0, abs=1e-10)
        assert w.var(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)


def test_whiten_masked_float32_with_huge_padding():
    x, mask = ragged_values(padding_value=1e6, dtype=torch.float32)
    w = common.whiten_masked(x, mask)[mask.bool()]
    assert torch.isfinite(w).all()
    assert w.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert w.var(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)


# ------------------------------------------------------------------------------------------------------------
# builtin_gold_score
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("great wonderful <eos>", 1.0),  # (+1 +1) / 2
        ("awful movie . <eos>", -0.5),  # (-1 + 0) / 2: '.' is not a word
        ("the plot was dull , but the acting was superb and moving . <eos>", 1 / 11),  # (-1 +1 +1) / 11 words
        ("great movie", 0.5 - 1.0),  # no <eos>: -1 extra
        ("terrible", -1.0 - 1.0),
        ("<eos>", 0.0),  # no words: polarity 0, ended
        ("", -1.0),  # no words, never ended
        ("<bos> loved it <pad> <eos>", 0.5),  # <bos>/<pad> not counted: loved, it
        ("i hated the movie , painfully slow<eos>", -2 / 6),  # <eos> glued to a word still splits it off
        (". , . <eos>", 0.0),  # punctuation only
    ],
)
def test_builtin_gold_score_crafted_texts(text, expected):
    assert common.builtin_gold_score([text]) == pytest.approx([expected], abs=1e-12)


def test_builtin_gold_score_is_per_text_and_in_range():
    texts = ["great <eos>", "awful", "the movie <eos>"]
    assert common.builtin_gold_score(texts) == pytest.approx([1.0, -2.0, 0.0])
    assert common.builtin_gold_score([]) == []


# ------------------------------------------------------------------------------------------------------------
# pad_left / encode_prompts
# ------------------------------------------------------------------------------------------------------------
def test_pad_left():
    ids, mask = common.pad_left([[1, 2, 3], [4], [5, 6]], pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4], [9, 5, 6]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert ids.dtype == mask.dtype == torch.long


def test_encode_prompts_left_truncates_and_counts():
    tok = word_tokenizer()
    a, b, c, d, e = (tok.convert_tokens_to_ids(w) for w in "abcde")
    prompts = ["a b c d e", "a b", "c d e"]
    # budget = min(max_prompt_length 3, context 32 - 4) = 3: keep the LAST 3 tokens
    rows, n_truncated = common.encode_prompts(tok, prompts, max_prompt_length=3, max_new_tokens=4, context=32)
    assert rows == [[c, d, e], [a, b], [c, d, e]]
    assert n_truncated == 1
    # budget from the context: min(10, 6 - 4) = 2
    rows, n_truncated = common.encode_prompts(tok, prompts, max_prompt_length=10, max_new_tokens=4, context=6)
    assert rows == [[d, e], [a, b], [d, e]]
    assert n_truncated == 2
    # nothing truncated
    rows, n_truncated = common.encode_prompts(tok, prompts, max_prompt_length=5, max_new_tokens=1, context=32)
    assert rows == [[a, b, c, d, e], [a, b], [c, d, e]] and n_truncated == 0


@pytest.mark.parametrize("max_new_tokens, context", [(8, 8), (9, 8)])
def test_encode_prompts_no_room_for_a_prompt(max_new_tokens, context):
    with pytest.raises(SystemExit) as info:
        common.encode_prompts(
            word_tokenizer(), ["a b"], max_prompt_length=4, max_new_tokens=max_new_tokens, context=context
        )
    message = str(info.value)
    assert message.startswith("error:") and "--max-new-tokens" in message and "\n" not in message


@pytest.mark.parametrize("prompts", [["a b", ""], ["   "]])
def test_encode_prompts_empty_prompt(prompts):
    with pytest.raises(SystemExit) as info:
        common.encode_prompts(word_tokenizer(), prompts, max_prompt_length=4, max_new_tokens=2, context=16)
    assert str(info.value).startswith("error:") and "empty prompt" in str(info.value)


# ------------------------------------------------------------------------------------------------------------
# load_prompts
# ------------------------------------------------------------------------------------------------------------
def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_load_prompts_jsonl(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [{"prompt": "the movie", "id": 1}, {"prompt": "i loved", "id": 2}, {"prompt": "it was", "id": 3}],
    )
    assert common.load_prompts(path, "train") == ["the movie", "i loved", "it was"]
    # a single-split file does not silently serve another split (that would evaluate on training data)
    with pytest.raises(SystemExit, match=r"no split 'test' \(it has: train\).*--eval-split"):
        common.load_prompts(path, "test")
    assert common.load_prompts(path, "train", prompt_field="id") == ["1", "2", "3"]


def test_load_prompts_missing_column_names_what_there_is(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "x", "label": 0}, {"text": "y", "label": 1}])
    with pytest.raises(SystemExit) as info:
        common.load_prompts(path, "train")
    message = str(info.value)
    assert message.startswith("error:") and "\n" not in message
    assert "'prompt'" in message and "text" in message and "label" in message and "--prompt-field" in message


def test_load_prompts_missing_file(tmp_path):
    with pytest.raises(SystemExit) as info:
        common.load_prompts(str(tmp_path / "absent.jsonl"), "train")
    assert str(tmp_path / "absent.jsonl") in str(info.value) and "--dataset" in str(info.value)


def test_load_prompts_save_to_disk_folder(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict(
        train=Dataset.from_dict({"prompt": ["a b", "c d", "e"], "x": [1, 2, 3]}),
        test=Dataset.from_dict({"prompt": ["f g"], "x": [4]}),
    ).save_to_disk(str(tmp_path / "dd"))
    assert common.load_prompts(str(tmp_path / "dd"), "train") == ["a b", "c d", "e"]
    assert common.load_prompts(str(tmp_path / "dd"), "test") == ["f g"]
    with pytest.raises(SystemExit) as info:
        common.load_prompts(str(tmp_path / "dd"), "validation")
    assert "'validation'" in str(info.value) and "train" in str(info.value) and "test" in str(info.value)
    # a single Dataset (not a dict) saved to disk
    Dataset.from_dict({"prompt": ["p q"]}).save_to_disk(str(tmp_path / "single"))
    assert common.load_prompts(str(tmp_path / "single"), "train") == ["p q"]


# ------------------------------------------------------------------------------------------------------------
# load_model / load_tokenizer
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "load",
    [
        lambda p: common.load_tokenizer(p),
        lambda p: common.load_model(p, "causal", "--model-name-or-path"),
        lambda p: common.load_model(p, "score", "--model-name-or-path"),
    ],
)
def test_loading_a_missing_folder_is_a_one_line_error(tmp_path, load):
    missing = str(tmp_path / "nope")
    with pytest.raises(SystemExit) as info:
        load(missing)
    message = str(info.value)
    assert message.startswith("error:") and "\n" not in message
    assert missing in message and "--model-name-or-path" in message


def test_load_model_error_names_the_flag_it_was_given(tmp_path):
    with pytest.raises(SystemExit) as info:
        common.load_model(str(tmp_path / "nope"), "score", "--reward-model")
    assert "--reward-model" in str(info.value) and "--model-name-or-path" not in str(info.value)


def test_load_saved_tiny_gpt2(tmp_path):
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

    folder = str(tmp_path / "tiny")
    saved = tiny_causal_lm(seed=5)
    saved.save_pretrained(folder)
    word_tokenizer(pad=False).save_pretrained(folder)  # no pad token: load_tokenizer pads with EOS

    causal = common.load_model(folder, "causal", "--model-name-or-path")
    assert isinstance(causal, GPT2LMHeadModel)
    for (name, a), (_, b) in zip(saved.state_dict().items(), causal.state_dict().items()):
        assert torch.equal(a, b), name
    score = common.load_model(folder, "score", "--reward-model")
    assert isinstance(score, GPT2ForSequenceClassification) and score.config.num_labels == 1
    assert score.score.weight.shape == (1, 32)
    assert torch.equal(score.transformer.wte.weight, saved.transformer.wte.weight)
    bf16 = common.load_model(folder, "causal", "--model-name-or-path", dtype="bfloat16")
    assert next(bf16.parameters()).dtype == torch.bfloat16

    tok = common.load_tokenizer(folder)
    assert tok.padding_side == "left"
    assert tok.pad_token == tok.eos_token == "<eos>"
    assert common.load_tokenizer(folder, padding_side="right").padding_side == "right"


@pytest.mark.parametrize(
    "unfrozen, trained",
    [
        (-1, {"wte", "wpe", "h.0", "h.1", "h.2", "h.3", "ln_f"}),
        (2, {"h.2", "h.3", "ln_f"}),
        (0, {"ln_f"}),
        (9, {"h.0", "h.1", "h.2", "h.3", "ln_f"}),
    ],
)
def test_freeze_lower_layers_trains_the_top_blocks_and_what_follows(unfrozen, trained):
    """trlX's num_layers_unfrozen (the released HH runs train the top 2 blocks): the embeddings, and the LM head
    tied to them, stay frozen unless every layer trains."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=4, n_head=2, bos_token_id=0, eos_token_id=0)
    )
    common.freeze_lower_layers(model, unfrozen)
    names = {
        ".".join(n.split(".")[1:3]) if ".h." in n else n.split(".")[1]
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    assert names == trained
    assert model.lm_head.weight.requires_grad == (unfrozen == -1)  # tied to wte


# ------------------------------------------------------------------------------------------------------------
# Sampling is the script's: a checkpoint's generation_config.json changes nothing
# ------------------------------------------------------------------------------------------------------------
CHAT_SAMPLING = dict(
    temperature=0.2,
    top_p=0.5,
    top_k=5,
    repetition_penalty=1.3,
    no_repeat_ngram_size=2,
    min_new_tokens=4,
    do_sample=True,
)


def test_checkpoint_sampling_settings_do_not_reach_generate(tmp_path):
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = tiny_causal_lm(seed=3)
    model.save_pretrained(tmp_path / "plain")
    model.generation_config = GenerationConfig(eos_token_id=1, bos_token_id=1, **CHAT_SAMPLING)
    model.save_pretrained(tmp_path / "chat")
    assert json.loads((tmp_path / "chat" / "generation_config.json").read_text())["repetition_penalty"] == 1.3
    # as the scripts sample: every field they own is set, the rest is left to generate's defaults
    script_config = GenerationConfig(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=16, pad_token_id=PAD_ID, eos_token_id=1
    )
    prompts = torch.randint(2, VOCAB, (8, 5), generator=torch.Generator().manual_seed(0))

    def sample(model):
        torch.manual_seed(7)
        return model.generate(prompts, attention_mask=torch.ones_like(prompts), generation_config=script_config)

    plain = sample(common.load_model(str(tmp_path / "plain"), "causal", "--model-name-or-path"))
    chat = sample(common.load_model(str(tmp_path / "chat"), "causal", "--model-name-or-path"))
    assert torch.equal(plain, chat)
    # the same checkpoint loaded bare samples otherwise: the settings would have leaked into the rollouts
    assert not torch.equal(plain, sample(AutoModelForCausalLM.from_pretrained(tmp_path / "chat")))
    # the token ids of the checkpoint's generation config are kept
    assert (
        common.load_model(str(tmp_path / "chat"), "causal", "--model-name-or-path").generation_config.eos_token_id == 1
    )


# ------------------------------------------------------------------------------------------------------------
# A reward / value model whose config has no pad id gets its tokenizer's
# ------------------------------------------------------------------------------------------------------------
GPT2_TOKENIZER = ROOT.parent / "shared" / "data" / "tokenizers" / "gpt2"


def save_llama_without_pad(folder):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    assert GPT2_TOKENIZER.exists(), f"{GPT2_TOKENIZER} is missing: the tests read the real GPT-2 BPE tokenizer there"
    tokenizer = AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
    )
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_reward_model_without_pad_id_scores_a_batch(tmp_path, architecture):
    """A GPT-2 or Llama reward model whose config has no pad id, with another tokenizer than the policy's: the
    texts are re-encoded and padded, and the model must read each row at its own last token."""
    folder = tmp_path / "rm"
    if architecture == "gpt2":
        from transformers import GPT2ForSequenceClassification

        torch.manual_seed(0)
        GPT2ForSequenceClassification(tiny_config(num_labels=1)).save_pretrained(folder)
        word_tokenizer(words=WORDS, pad=False).save_pretrained(folder)  # pad = EOS, as with GPT-2's tokenizer
    else:
        save_llama_without_pad(folder)
    assert json.loads((folder / "config.json").read_text()).get("pad_token_id") is None
    policy_tokenizer = word_tokenizer(words=WORDS + ("x",))  # another vocabulary than the reward model's
    queries = [policy_tokenizer.encode(q) for q in ("the film", "the story", "film")]
    responses = [policy_tokenizer.encode(r) for r in ("was great", "was dull", "was long and dull")]
    query_ids, query_mask = common.pad_left(queries, policy_tokenizer.pad_token_id)
    response_ids = torch.zeros(len(responses), max(map(len, responses)), dtype=torch.long)
    response_mask = torch.zeros_like(response_ids)
    for i, r in enumerate(responses):
        response_ids[i, : len(r)] = torch.tensor(r)
        response_mask[i, : len(r)] = 1

    reward = common.load_reward(str(folder), policy_tokenizer)
    assert not reward.same_vocabulary
    scores = reward(query_ids, query_mask, response_ids, response_mask)

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    rm_tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = [policy_tokenizer.decode(q + r) for q, r in zip(queries, responses)]
    with torch.no_grad():  # one row at a time: no padding, so no pad id needed
        alone = [model(**rm_tokenizer(t, return_tensors="pt")).logits[0, 0].item() for t in texts]
    assert scores.tolist() == pytest.approx(alone, abs=1e-5)


WORDS = ("the", "film", "story", "was", "great", "dull", "long", "and")


# ------------------------------------------------------------------------------------------------------------
# Learning-rate schedules, PPO-max's repetition penalty, flags given on the command line
# ------------------------------------------------------------------------------------------------------------
def test_lr_schedules_by_hand():
    constant = common.lr_schedule(4, 20, "constant")
    assert [constant(s) for s in (0, 1, 3, 4, 19, 50)] == pytest.approx([0.25, 0.5, 1, 1, 1, 1])
    linear = common.lr_schedule(4, 20, "linear")  # warm-up to step 4, then 1 → 0 over steps 4..20
    assert [linear(s) for s in (0, 3, 4, 12, 20, 30)] == pytest.approx([0.25, 1, 1, 0.5, 0, 0])
    cosine = common.lr_schedule(0, 10, "cosine")
    assert [cosine(s) for s in (0, 5, 10)] == pytest.approx([1, 0.5, 0], abs=1e-12)
    inverse_sqrt = common.lr_schedule(100, 1000, "inverse_sqrt")  # MOSS-RLHF's sqrt(warm-up / step) after warm-up
    assert [inverse_sqrt(s) for s in (49, 100, 400, 10000)] == pytest.approx([0.5, 1, 0.5, 0.1])
    with pytest.raises(SystemExit, match="--lr-schedule"):
        common.lr_schedule(0, 10, "exponential")


def test_response_repetition_penalty_on_crafted_scores():
    processor = common.ResponseRepetitionPenalty(2.0, prompt_length=2)
    input_ids = torch.tensor([[3, 1, 2, 2, 0], [4, 4, 1, 1, 1]])  # prompt 2 tokens, then the response so far
    scores = torch.tensor([[1.0, -1.0, 4.0, -2.0, 6.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    expected = torch.tensor(
        [
            [0.5, -1.0, 2.0, -2.0, 6.0],  # 0 and 2 emitted; 3 only in the prompt: kept
            [1.0, 1.0, 3.0, 4.0, 5.0],
        ]
    )  # 1 emitted (three times: penalised once); 4 prompt only
    assert torch.equal(processor(input_ids, scores), expected)
    assert torch.equal(common.ResponseRepetitionPenalty(2.0, 5)(input_ids, scores), scores)  # nothing emitted yet


@pytest.mark.parametrize("penalty, temperature", [(1.3, 1.0), (1.1, 0.8), (1.0, 0.7)])
def test_forward_logprobs_are_those_of_the_distribution_generate_sampled(penalty, temperature):
    """generate's processed scores (penalty, then temperature) give each sampled token's log-prob; forward_logprobs
    over the same (left-padded prompt | response) must give the very same numbers."""
    from transformers import GenerationConfig, LogitsProcessorList

    model = tiny_causal_lm(seed=11)
    _, _, query_ids, query_mask, _, _ = ragged_batch(seed=4)
    config = GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=10,
        pad_token_id=PAD_ID,
        eos_token_id=VOCAB + 1,
        output_scores=True,
        return_dict_in_generate=True,
    )  # no EOS: every response runs 10 tokens
    processors = LogitsProcessorList([common.ResponseRepetitionPenalty(penalty, query_ids.shape[1])])
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(
            input_ids=query_ids, attention_mask=query_mask, generation_config=config, logits_processor=processors
        )
        response_ids = out.sequences[:, query_ids.shape[1] :]
        sampled = torch.stack([torch.log_softmax(step.float(), -1) for step in out.scores], 1)
        expected = sampled.gather(-1, response_ids[..., None]).squeeze(-1)
        got = common.forward_logprobs(
            model,
            query_ids,
            query_mask,
            response_ids,
            torch.ones_like(response_ids),
            temperature=temperature,
            repetition_penalty=penalty,
        )
    assert got.tolist() == [pytest.approx(row, abs=1e-4) for row in expected.tolist()]


@dataclasses.dataclass
class _Args:
    preset: str | None = None
    """a preset's name"""
    learning_rate: float = 1e-3
    """a rate"""
    adaptive_kl: bool = True
    """a switch"""


_PRESETS = {"paper": dict(learning_rate=5e-7, adaptive_kl=False)}


def test_a_preset_sets_the_defaults_and_flags_on_the_command_line_win():
    assert common.parse_args(_Args, _PRESETS, argv=[]) == _Args()
    assert common.parse_args(_Args, _PRESETS, argv=["--preset", "paper"]) == _Args("paper", 5e-7, False)
    given = common.parse_args(_Args, _PRESETS, argv=["--learning-rate", "3e-5", "--preset=paper", "--adaptive-kl"])
    assert given == _Args("paper", 3e-5, True)


def test_an_unknown_preset_is_a_one_line_error_that_lists_the_presets():
    with pytest.raises(SystemExit, match="--preset hh is not one of this script's presets; pick one of: paper"):
        common.parse_args(_Args, _PRESETS, argv=["--preset", "hh"])


def test_offline_rows_end_in_eos_within_the_response_budget():
    tokenizer = common.load_tokenizer("builtin")
    eos = tokenizer.eos_token
    batch = common.encode_offline_rows(
        tokenizer,
        ["the film", "a plot"],
        ["was great" + eos, "was " + "very " * 40 + "dull"],
        max_prompt_length=8,
        max_new_tokens=6,
        context=64,
    )
    lengths = batch.response_mask.sum(1).long().tolist()
    assert lengths == [len(tokenizer("was great", add_special_tokens=False)["input_ids"]) + 1, 6]
    for row, n in zip(batch.response_ids.tolist(), lengths):
        assert row[n - 1] == tokenizer.eos_token_id  # one EOS, last: the one in the text was dropped
        assert tokenizer.eos_token_id not in row[: n - 1]
        assert row[n:] == [tokenizer.pad_token_id] * (len(row) - n)
    assert batch.rows([1]).response_ids.tolist() == batch.response_ids[1:].tolist()
    assert batch.query_mask.sum(1).tolist() == [len(tokenizer(p)["input_ids"]) for p in ["the film", "a plot"]]


def test_builtin_reward_scores_offline_rows_with_a_float_mask():
    """A Batch from encode_offline_rows has a float response mask; the reward model that shares the policy's
    vocabulary reads each row at its last response token, as with an integer mask."""
    tokenizer = common.load_tokenizer("builtin")
    batch = common.encode_offline_rows(
        tokenizer,
        ["the film", "a plot"],
        ["was great", "was dull and long"],
        max_prompt_length=8,
        max_new_tokens=8,
        context=64,
    )
    reward = common.load_reward("builtin", tokenizer)
    assert reward.same_vocabulary
    with_float = reward(*batch, ["the film", "a plot"])
    with_long = reward(*batch[:3], batch.response_mask.long(), ["the film", "a plot"])
    assert with_float.tolist() == with_long.tolist()


def test_value_model_starts_from_the_reward_only_where_it_reads_the_policys_ids(capsys):
    """--value-model reward is kept only for a reward model with the policy's vocabulary; else the run uses (and
    prints that it uses) the policy; a model name is kept as given. The answer is returned: args stay as parsed."""
    shared = common.Reward(score=lambda *batch, prompts=None: None, same_vocabulary=True)
    other = shared._replace(same_vocabulary=False)
    assert common.value_model_start("reward", shared, rank=0) == "reward"
    assert capsys.readouterr().out == ""
    assert common.value_model_start("reward", other, rank=1) == "policy"
    assert capsys.readouterr().out == ""  # the note is rank 0's
    assert common.value_model_start("reward", other, rank=0) == "policy"
    assert "initialised from the policy" in capsys.readouterr().out
    assert common.value_model_start("some/critic", other, rank=0) == "some/critic"
    assert common.load_reward("builtin", common.load_tokenizer("builtin")).same_vocabulary


def test_placement_carries_the_parsed_settings_to_every_model():
    """Placement.of(args) holds the shared settings once: a model it loads is in --bf16's dtype, the engine it makes
    gets the optimiser's settings, and a frozen model is on its device without gradients."""
    args = dataclasses.replace(common.RunArgs(), bf16=True, adam_eps=1e-6, adam_betas=(0.8, 0.9), weight_decay=0.1)
    place = common.Placement.of(args)
    assert (place.zero_stage, place.micro_batch_size, place.dtype) == (0, args.mini_batch_size, "bfloat16")
    policy = place.load("builtin", kind="causal", flag="--model-name-or-path", at="cpu")
    assert next(policy.parameters()).dtype == torch.bfloat16
    value = place.load("builtin", kind="score", flag="--value-model", at="cpu", dtype="float32", pad_token_id=0)
    assert next(value.parameters()).dtype == torch.float32
    engine = place.trainable(value, at="cpu", lr=1e-3)
    group = engine.optimizer.param_groups[0]
    assert (group["eps"], group["betas"], group["weight_decay"], group["lr"]) == (1e-6, (0.8, 0.9), 0.1, 1e-3)
    frozen = place.frozen(policy, at="cpu")
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())


# ---- Caches: content keys and cached results ----------------------------------------------------------------------
def test_cached_computes_once_and_recomputes_when_its_key_changes(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"advantages": torch.arange(4.0) * len(calls), "ref_logprobs": torch.ones(2, 3)}, {"epoch": len(calls)}

    key = {"model": "m", "data": "d1", "seed": 1}
    tensors, info, hit = common.cached(key, compute, str(tmp_path))
    assert (len(calls), hit, info) == (1, False, {"epoch": 1})
    tensors2, info2, hit2 = common.cached(dict(key), compute, str(tmp_path))  # same key: read back, not recomputed
    assert (len(calls), hit2, info2) == (1, True, {"epoch": 1})
    assert torch.equal(tensors2["advantages"], tensors["advantages"])
    assert torch.equal(tensors2["ref_logprobs"], torch.ones(2, 3))
    _, info3, hit3 = common.cached({**key, "data": "d2"}, compute, str(tmp_path))  # data changed: recomputed
    assert (len(calls), hit3, info3) == (2, False, {"epoch": 2})
    _, _, hit4 = common.cached({**key, "seed": 2}, compute, str(tmp_path))  # any setting changed: recomputed
    assert (len(calls), hit4) == (3, False)
    _, _, hit5 = common.cached(key, compute, str(tmp_path), use_cache=False)  # --no-cache: recomputed, overwritten
    assert (len(calls), hit5) == (4, False)
    tensors6, _, hit6 = common.cached(key, compute, str(tmp_path))
    assert (len(calls), hit6) == (4, True) and torch.equal(tensors6["advantages"], torch.arange(4.0) * 4)
    assert len(list(tmp_path.glob("*.json"))) == 3 and not list(tmp_path.glob("*.tmp"))


def test_cached_checks_the_stored_key(tmp_path):
    """An entry whose stored key differs from the one asked for (a hash collision, a hand-edited file) is not used."""
    calls = []

    def compute():
        calls.append(1)
        return {"x": torch.zeros(1)}, {}

    common.cached({"a": 1}, compute, str(tmp_path))
    (entry,) = tmp_path.glob("*.safetensors")
    record, tensors = common._read_entry(str(entry.with_suffix("")))
    assert record["key"] == {"a": 1}
    common._write_entry(str(entry.with_suffix("")), tensors, {**record, "key": {"a": 2}})  # the file edited by hand
    _, _, hit = common.cached({"a": 1}, compute, str(tmp_path))
    assert not hit and len(calls) == 2


def test_cached_rows_beside_another_run_adding_rows(tmp_path):
    """Two runs adding rows to one entry at once (alol.py's variants sharing a cache): while this run computes its
    rows, another adds other rows; the entry then holds both runs' rows, each under its own digest, and each run
    reads back the values that row was stored with."""

    def values(digests):
        return lambda positions: {"logps": torch.tensor([float(ord(digests[i])) for i in positions.tolist()])}

    common.cached_rows({"m": 1}, ["a"], values(["a"]), str(tmp_path))

    def compute_while_another_run_writes(positions):
        common.cached_rows({"m": 1}, ["a", "x", "y"], values(["a", "x", "y"]), str(tmp_path))
        return values(["a", "b", "c"])(positions)

    tensors, computed = common.cached_rows({"m": 1}, ["a", "b", "c"], compute_while_another_run_writes, str(tmp_path))
    assert computed == 2 and tensors["logps"].tolist() == [97, 98, 99]
    (entry,) = tmp_path.glob("*.json")
    assert sorted(json.loads(entry.read_text())["rows"]) == ["a", "b", "c", "x", "y"]
    every, computed = common.cached_rows({"m": 1}, ["y", "c", "x", "b", "a"], values([]), str(tmp_path))
    assert computed == 0 and every["logps"].tolist() == [121, 99, 120, 98, 97]


def test_cached_rows_computes_only_the_rows_it_lacks(tmp_path):
    """Each row read back under its own digest; a longer list computes only the rows added; another key (or
    --no-cache) computes every row."""
    calls = []

    def compute(positions):
        calls.append(positions.tolist())
        return {"ref_chosen_logps": torch.tensor([float(ord(digests[i])) for i in positions.tolist()])}

    digests = ["a", "b"]
    first, computed = common.cached_rows({"model": "a"}, digests, compute, str(tmp_path))
    assert computed == 2 and first["ref_chosen_logps"].tolist() == [97, 98]
    digests = ["c", "b", "a"]  # a later run with one row more, in another order
    again, computed = common.cached_rows({"model": "a"}, digests, compute, str(tmp_path))
    assert computed == 1 and calls[-1] == [0] and again["ref_chosen_logps"].tolist() == [99, 98, 97]
    (entry,) = tmp_path.glob("*.json")
    assert json.loads(entry.read_text())["rows"] == ["a", "b", "c"]
    _, computed = common.cached_rows({"model": "a"}, ["b"], compute, str(tmp_path))
    assert computed == 0 and len(calls) == 2
    _, computed = common.cached_rows({"model": "b"}, ["b"], compute, str(tmp_path))
    assert computed == 1
    _, computed = common.cached_rows({"model": "a"}, ["b"], compute, str(tmp_path), use_cache=False)
    assert computed == 1


def test_fingerprint_keys_a_local_model_by_its_content(tmp_path):
    import shutil

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 1000)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)  # new modification times, same bytes
    assert common.fingerprint(str(folder), "sft") == common.fingerprint(str(copy), "sft")
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[1234] ^= 1  # one bit of the weights
    (copy / "model.safetensors").write_bytes(bytes(data))
    assert common.fingerprint(str(folder), "sft") != common.fingerprint(str(copy), "sft")
    assert common.fingerprint("my_rewards:score", "reward") == ["my_rewards:score"]  # code: its name


def test_file_digest_of_a_large_file_sees_a_change_in_its_middle(tmp_path):
    """Above `whole_below` the digest reads evenly spaced chunks: a change wider than their spacing anywhere (here a
    block in the middle, as when only the top blocks of a model train) changes it; the first and last bytes alone
    would not see it."""
    sampled = dict(whole_below=1000, samples=9, chunk=10)  # 100,000 bytes: 9 chunks of 10 bytes, 12,498 apart
    path = tmp_path / "weights.bin"
    data = bytearray(torch.randint(256, (100_000,), generator=torch.Generator().manual_seed(0)).byte().numpy())
    path.write_bytes(bytes(data))
    before = common.file_digest(str(path), **sampled)
    assert common.file_digest(str(path), **sampled) == before
    original = bytes(data)
    data[40_000:60_000] = bytes(20_000)  # a block of 20,000 bytes in the middle, wider than the spacing
    path.write_bytes(bytes(data))
    assert original[:1000] == data[:1000] and original[-1000:] == data[-1000:]  # first and last bytes as they were
    assert common.file_digest(str(path), **sampled) != before


def test_fingerprint_of_a_hub_model_is_the_commit_of_the_revision_a_run_loads(monkeypatch):
    """A released reward model that RELEASED_REVISIONS pins is keyed by its pinned commit, not by main's; another
    pin keys it apart; an unpinned name by the commit the hub resolves main to."""
    import huggingface_hub

    asked = []

    def model_info(name, revision=None):
        asked.append((name, revision))
        return SimpleNamespace(sha=f"commit-of-{revision or 'main'}")

    monkeypatch.setattr(huggingface_hub, "model_info", model_info)
    monkeypatch.setattr(common, "RELEASED_REVISIONS", {"org/rm": "676bfd4d"})
    assert common.fingerprint("org/rm", "reward") == ["org/rm", "676bfd4d"]  # a commit hash: no hub asked
    assert common.fingerprint("org/policy", "sft") == ["org/policy", "commit-of-main"]
    assert asked == [("org/policy", None)]
    monkeypatch.setattr(common, "RELEASED_REVISIONS", {"org/rm": "0123abcd"})
    assert common.fingerprint("org/rm", "reward") == ["org/rm", "0123abcd"]
    assert common.hub_commit("org/rm", "v1.0") == "commit-of-v1.0"  # a branch or tag: the hub resolves it


def test_distinct_n_by_hand():
    # "the cat saw the cat": unigrams the, cat, saw, the, cat (3 distinct of 5); bigrams "the cat", "cat saw",
    # "saw the", "the cat" (3 of 4); with "a cat" too: bigrams + "a cat" (4 of 5), over all texts together
    assert common.distinct_n(["the cat saw the cat"], 1) == pytest.approx(3 / 5)
    assert common.distinct_n(["the cat saw the cat"], 2) == pytest.approx(3 / 4)
    assert common.distinct_n(["the cat saw the cat", "a cat"], 2) == pytest.approx(4 / 5)
    assert common.distinct_n(["a b", "a b"], 2) == 0.5  # not per text
    assert common.distinct_n([""], 2) == 0.0


def test_optional_part_is_not_mistaken_for_a_module_of_the_same_name(tmp_path, monkeypatch):
    """A project that copies a script may have its own `formats` module imported already: optional_part loads the
    project's formats.py beside common.py under another key, and leaves the user's module where it was."""
    import sys
    import types

    theirs = types.ModuleType("formats")
    theirs.__file__ = str(tmp_path / "formats.py")
    monkeypatch.delitem(sys.modules, "onefile_rlhf_formats", raising=False)
    monkeypatch.setitem(sys.modules, "formats", theirs)
    ours = common.optional_part("formats.py", needed_for="HH rows")
    assert ours is not theirs and hasattr(ours, "split_hh")
    assert sys.modules["formats"] is theirs
    assert common.optional_part("formats.py") is ours


def test_a_file_read_for_training_and_evaluation_is_read_once(tmp_path, monkeypatch):
    """--eval-split 'train[-25%:]' of the training file: one read of the file for both splits; the file written
    again is read again."""
    import datasets

    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(8)))
    reads = []
    load_dataset = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: reads.append(a) or load_dataset(*a, **k))
    held_out = (str(path), "train[-25%:]")
    train = common.load_prompts(str(path), "train", held_out=held_out)
    held = common.load_prompts(str(path), "train[-25%:]")
    assert (train, held, len(reads)) == ([f"p{i}" for i in range(6)], ["p6", "p7"], 1)
    path.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(4)))
    assert common.load_prompts(str(path), "train") == ["q0", "q1", "q2", "q3"] and len(reads) == 2
