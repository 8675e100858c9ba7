"""Dataset shapes read by common.canonical_rows / load_prompts / load_offline_rows: Anthropic HH transcripts (the
real test rows in ../shared/data/hh-rlhf), rm-static rows and TL;DR rows made here."""
import gzip
import json
from pathlib import Path

import pytest

import common
from conftest import ROOT

HH = ROOT.parent / "shared" / "data" / "hh-rlhf"
FILES = ["harmless-base-test.jsonl.gz", "helpful-base-test.jsonl.gz"]


def _hh_rows(name):
    path = HH / name
    assert path.exists(), f"{path} is missing: the HH parser tests need ../shared/data beside the project"
    with gzip.open(path, "rt") as f:
        return path, [json.loads(line) for line in f]


@pytest.mark.parametrize("name", FILES)
def test_hh_rows_split_exactly_at_the_last_assistant_turn(name):
    path, raw = _hh_rows(name)
    prompts, responses, rewards = common.load_offline_rows(str(path))
    n = len(prompts) // 2
    assert rewards == [1.0] * n + [0.0] * n and prompts[:n] == prompts[n:]
    # the expected split, written independently: rpartition at the last "\n\nAssistant:"
    expected = []
    for row in raw:
        (head_c, sep_c, chosen), (head_r, sep_r, rejected) = (row[k].rpartition("\n\nAssistant:")
                                                              for k in ("chosen", "rejected"))
        if sep_c and head_c == head_r and chosen.strip() and rejected.strip():
            expected.append((head_c + sep_c, chosen, rejected))
    assert list(zip(prompts[:n], responses[:n], responses[n:])) == expected
    assert len(raw) - 20 < n < len(raw)  # a handful of rows differ before the last reply or have an empty reply
    for prompt, chosen in zip(prompts[:n], responses[:n]):
        assert prompt.startswith("\n\nHuman:") and prompt.endswith("\n\nAssistant:")
        assert "\n\nAssistant:" not in chosen and "\n\nHuman:" not in chosen
    # the prompts of the same file, as an online script reads them
    assert common.load_prompts(str(path), "train") == prompts[:n]


def test_split_hh_by_hand():
    dialogue = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: fine, thanks"
    assert common.split_hh(dialogue) == ("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:",
                                         " fine, thanks")
    assert common.split_hh("no turns here") == (None, "no turns here")


def _write(tmp_path, rows):
    path = Path(tmp_path) / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_rm_static_rows_are_preference_rows(tmp_path):
    rows = [{"prompt": f"\n\nHuman: q{i}\n\nAssistant:", "response": f" good{i}", "chosen": f" good{i}",
             "rejected": f" bad{i}"} for i in range(3)]
    prompts, responses, rewards = common.load_offline_rows(_write(tmp_path, rows))
    assert prompts == [r["prompt"] for r in rows] * 2
    assert responses == [" good0", " good1", " good2", " bad0", " bad1", " bad2"]
    assert rewards == [1.0] * 3 + [0.0] * 3


def test_tldr_rows(tmp_path):
    rows = [{"prompt": "SUBREDDIT: r/a\nPOST: my cat\nTL;DR:", "label": " cat"},
            {"prompt": "SUBREDDIT: r/b\nPOST: my dog", "label": " dog"}]
    path = _write(tmp_path, rows)
    import datasets
    canonical = common.canonical_rows(datasets.load_dataset("json", data_files=path)["train"], "tldr")
    assert canonical == {"prompt": ["SUBREDDIT: r/a\nPOST: my cat\nTL;DR:", "SUBREDDIT: r/b\nPOST: my dog\nTL;DR:"],
                         "response": [" cat", " dog"]}
    assert common.load_prompts(path, "train") == canonical["prompt"]


def test_unknown_shape_names_the_columns(tmp_path):
    path = _write(tmp_path, [{"question": "q", "answer": "a"}])
    with pytest.raises(SystemExit, match="offline rows need prompt, response, reward"):
        common.load_offline_rows(path)
    with pytest.raises(SystemExit, match="has no column 'prompt'.*--prompt-field"):
        common.load_prompts(path, "train")


def test_field_mapping_of_plain_rows(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}", "score": i / 2, "prompt": "ignored"} for i in range(3)]
    path = _write(tmp_path, rows)
    fields = dict(prompt="question", response="answer", reward="score")
    assert common.load_offline_rows(path, fields=fields) == (["q0", "q1", "q2"], ["a0", "a1", "a2"], [0.0, 0.5, 1.0])
    with pytest.raises(SystemExit, match="offline rows need prompt, response, reward"):
        common.load_offline_rows(path, fields=dict(prompt="question", response="missing", reward="score"))
