"""Dataset shapes read by common.canonical_rows / load_prompts / load_offline_rows: Anthropic HH transcripts (the
real test rows in ../shared/data/hh-rlhf), rm-static rows, TL;DR rows and PRO / A-LoL {prefix, suffix, reward} rows
made here (some of them from the real HH rows)."""

import gzip
import json
import re
from pathlib import Path

import pytest
from conftest import ROOT

import common
import formats

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
        (head_c, sep_c, chosen), (head_r, _sep_r, rejected) = (
            row[k].rpartition("\n\nAssistant:") for k in ("chosen", "rejected")
        )
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
    assert formats.split_hh(dialogue) == (
        "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:",
        " fine, thanks",
    )
    assert formats.split_hh("no turns here") == (None, "no turns here")


def _write(tmp_path, rows):
    path = Path(tmp_path) / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_rm_static_rows_are_preference_rows(tmp_path):
    rows = [
        {
            "prompt": f"\n\nHuman: q{i}\n\nAssistant:",
            "response": f" good{i}",
            "chosen": f" good{i}",
            "rejected": f" bad{i}",
        }
        for i in range(3)
    ]
    prompts, responses, rewards = common.load_offline_rows(_write(tmp_path, rows))
    assert prompts == [r["prompt"] for r in rows] * 2
    assert responses == [" good0", " good1", " good2", " bad0", " bad1", " bad2"]
    assert rewards == [1.0] * 3 + [0.0] * 3


def test_tldr_rows(tmp_path):
    rows = [
        {"prompt": "SUBREDDIT: r/a\nPOST: my cat\nTL;DR:", "label": " cat"},
        {"prompt": "SUBREDDIT: r/b\nPOST: my dog", "label": " dog"},
    ]
    path = _write(tmp_path, rows)
    import datasets

    canonical = common.canonical_rows(datasets.load_dataset("json", data_files=path)["train"], "tldr")
    assert canonical == {
        "prompt": ["SUBREDDIT: r/a\nPOST: my cat\nTL;DR:", "SUBREDDIT: r/b\nPOST: my dog\nTL;DR:"],
        "response": [" cat", " dog"],
    }
    assert common.load_prompts(path, "train") == canonical["prompt"]


def test_unknown_shape_names_the_columns(tmp_path):
    path = _write(tmp_path, [{"question": "q", "answer": "a"}])
    with pytest.raises(SystemExit, match="offline rows need prompt, response, reward"):
        common.load_offline_rows(path)
    with pytest.raises(SystemExit, match=r"has no column 'prompt'.*--prompt-field"):
        common.load_prompts(path, "train")


def test_field_mapping_of_plain_rows(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}", "score": i / 2, "prompt": "ignored"} for i in range(3)]
    path = _write(tmp_path, rows)
    fields = dict(prompt="question", response="answer", reward="score")
    assert common.load_offline_rows(path, fields=fields) == (["q0", "q1", "q2"], ["a0", "a1", "a2"], [0.0, 0.5, 1.0])
    with pytest.raises(SystemExit, match="offline rows need prompt, response, reward"):
        common.load_offline_rows(path, fields=dict(prompt="question", response="missing", reward="score"))


# PRO's preprocessed HH files (AlibabaResearch/DAMO-ConvAI PRO/train/hh_preprocess_data), which A-LoL trains on:
# {"prefix": one list of turns per candidate, "suffix": candidates, "reward": one float each, "sft_index", "meta"}.
def test_pro_rows_one_row_per_suffix(tmp_path, capsys):
    turns = [
        "<|prompter|>How do I boil an egg?",
        "<|assistant|>In water.",
        "<|prompter|>For how long?",
        "<|assistant|>",
    ]
    rows = [
        {
            "prefix": [turns, turns],
            "suffix": ["About ten minutes.", "Forever."],
            "reward": [1.5, -0.25],
            "sft_index": 0,
            "meta": {"task": "dialogue", "line_num": 1},
        },
        {
            "prefix": [["<|prompter|>Hi", "<|assistant|>"]] * 3,
            "suffix": ["Hello!", " Hey.", "Go away."],
            "reward": [0.5, 0.0, -2.0],
            "sft_index": 0,
            "meta": {"task": "dialogue", "line_num": 2},
        },
        {
            "prefix": [turns, turns, turns],
            "suffix": ["a", "b", "c"],
            "reward": [1.0, 2.0],  # ragged: dropped
            "sft_index": 0,
            "meta": {"task": "dialogue", "line_num": 3},
        },
        {
            "prefix": [turns, turns],
            "suffix": ["Ten.", "  "],
            "reward": [3.0, 4.0],  # a blank suffix: dropped
            "sft_index": 0,
            "meta": {"task": "dialogue", "line_num": 4},
        },
    ]
    path = _write(tmp_path, rows)
    prompts, responses, rewards = common.load_offline_rows(path)
    dialogue = "\n\nHuman: How do I boil an egg?\n\nAssistant: In water.\n\nHuman: For how long?\n\nAssistant:"
    assert prompts == [
        dialogue,
        dialogue,
        "\n\nHuman: Hi\n\nAssistant:",
        "\n\nHuman: Hi\n\nAssistant:",
        "\n\nHuman: Hi\n\nAssistant:",
        dialogue,
    ]
    assert responses == [" About ten minutes.", " Forever.", " Hello!", " Hey.", " Go away.", " Ten."]
    assert rewards == [1.5, -0.25, 0.5, 0.0, -2.0, 3.0]
    out = capsys.readouterr().out
    assert "note: 1 of 4 PRO rows" in out and "1 blank suffixes dropped" in out
    # the prompts, as an online script reads them: one per candidate
    assert common.load_prompts(path, "train") == prompts


def test_pro_rows_with_one_shared_list_of_turns_or_plain_prompts(tmp_path):
    shared = [
        {
            "prefix": ["<|prompter|>Hi", "<|assistant|>Hello", "<|prompter|>Bye", "<|assistant|>"],
            "suffix": ["See you.", "No."],
            "reward": [1.0, 0.0],
        }
    ]
    prompt = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye\n\nAssistant:"
    (tmp_path / "shared").mkdir()
    (tmp_path / "tldr").mkdir()
    assert common.load_offline_rows(_write(tmp_path / "shared", shared)) == (
        [prompt] * 2,
        [" See you.", " No."],
        [1.0, 0.0],
    )
    tldr = [
        {
            "prefix": ["POST: my cat\nTL;DR:", "POST: my cat\nTL;DR:"],
            "suffix": [" cat", " a pet"],
            "reward": [0.5, 0.25],
        }
    ]  # PRO's TL;DR files: plain prompts, kept as they are
    assert common.load_offline_rows(_write(tmp_path / "tldr", tldr)) == (
        ["POST: my cat\nTL;DR:"] * 2,
        [" cat", " a pet"],
        [0.5, 0.25],
    )


def test_real_hh_rows_in_pro_shape_give_back_the_hh_split(tmp_path):
    import re

    path, raw = _hh_rows("harmless-base-test.jsonl.gz")
    role = {"Human": "<|prompter|>", "Assistant": "<|assistant|>"}
    pro, expected = [], []
    for row in raw:
        (prompt, chosen), (other, rejected) = formats.split_hh(row["chosen"]), formats.split_hh(row["rejected"])
        if prompt is None or prompt != other or not chosen.strip() or not rejected.strip():
            continue
        turns = []  # PRO's turns: the role token, then the text after "Human: " / "Assistant: "
        for segment in filter(None, re.split(r"(?=\n\n(?:Human|Assistant):)", prompt)):
            name, _, text = segment[2:].partition(":")
            assert segment.startswith("\n\n") and (text.startswith(" ") or text == ""), segment
            turns.append(role[name] + text[1:])
        assert turns[-1] == "<|assistant|>" and chosen.startswith(" ") and rejected.startswith(" ")
        pro.append(
            {
                "prefix": [turns, turns],
                "suffix": [chosen[1:], rejected[1:]],
                "reward": [1, 0],
                "sft_index": 0,
                "meta": {"line_num": len(pro)},
            }
        )
        expected += [(prompt, chosen, 1.0), (prompt, rejected, 0.0)]
    assert len(pro) == 2303
    prompts, responses, rewards = common.load_offline_rows(_write(tmp_path, pro))
    assert list(zip(prompts, responses, rewards)) == expected
    # the same rows, as the HH transcripts themselves give them (chosen rows first, then rejected)
    hh_prompts, hh_responses, hh_rewards = common.load_offline_rows(str(path))
    assert sorted(zip(hh_prompts, hh_responses, hh_rewards)) == sorted(expected)


def test_rankings_from_pro_rows_keep_each_row_whole(tmp_path):
    turns = ["<|prompter|>Hi", "<|assistant|>"]
    rows = [
        {"prefix": [turns] * 3, "suffix": ["Hello!", " Hey.", "Go away."], "reward": [0.5, 0.0, -2.0]},
        {"prefix": [turns] * 2, "suffix": ["Yes.", "No."], "reward": [1, 2]},
    ]
    prompts, candidates, rewards = common.load_rankings(_write(tmp_path, rows))
    assert prompts == ["\n\nHuman: Hi\n\nAssistant:"] * 2
    assert candidates == [[" Hello!", " Hey.", " Go away."], [" Yes.", " No."]]
    assert rewards == [[0.5, 0.0, -2.0], [1.0, 2.0]]


def test_rankings_from_preference_rows_and_the_builtin_task(tmp_path):
    rows = [{"prompt": "the film", "chosen": "was great", "rejected": "was dull"}]
    assert common.load_rankings(_write(tmp_path, rows)) == (["the film"], [["was great", "was dull"]], [[1.0, 0.0]])
    assert common.load_preference_pairs(_write(tmp_path, rows)) == (["the film"], ["was great"], ["was dull"])
    prompts, candidates, rewards = common.load_rankings("builtin")
    assert len(prompts) == common.optional_part("builtin/build.py").BUILTIN_SETTINGS["n_ranking_prompts"]
    assert {len(c) for c in candidates} == {len(r) for r in rewards} == {4}
    assert len(common.load_preference_pairs("builtin")[0]) > 1000


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "p", "responses": ["a", "b", "c"], "rewards": [1.0, 2.0]}, "row 0 has 3 candidates and 2 rewards"),
        ({"prompt": "p", "responses": ["a"], "rewards": [1.0]}, "row 0 has 1 candidate; a ranking needs at least 2"),
        ({"prompt": "p", "responses": ["a", "b"], "rewards": [1.0, float("nan")]}, "row 0 has a NaN or inf reward"),
    ],
)
def test_bad_rankings_fail_with_one_line(tmp_path, row, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        common.load_rankings(_write(tmp_path, [row]))


def test_scored_rows_are_not_preference_pairs(tmp_path):
    rows = [{"prompt": "p", "response": "r", "reward": 1.0}]
    with pytest.raises(SystemExit, match="preference pairs need prompt, chosen, rejected"):
        common.load_preference_pairs(_write(tmp_path, rows))


@pytest.mark.parametrize("held", ["train[-5%:]", "train[:10]", "train[10%:20%]"])
def test_a_slice_of_a_local_file_is_held_out_of_training(tmp_path, held):
    """--eval-split 'train[-5%:]' on a one-split file: the evaluated rows and the training rows (prompts, and the
    preference pairs of an offline run on the same file) are disjoint, in file order, and together the whole file."""
    rows = [{"prompt": f"prompt {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(43)]
    path = Path(tmp_path) / "rows.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    path = str(path)
    evaluated = common.load_prompts(path, held)
    trained = common.load_prompts(path, "train", held_out=(path, held))
    index = [int(prompt.split()[1]) for prompt in evaluated + trained]
    assert evaluated and trained and sorted(index) == list(range(len(rows)))  # disjoint, covering the file
    assert index[: len(evaluated)] == sorted(index[: len(evaluated)]) and index[len(evaluated) :] == sorted(
        index[len(evaluated) :]
    )
    prompts, chosen, rejected = common.load_preference_pairs(path, "train", held_out=(path, held))
    assert prompts == trained and chosen == [p.replace("prompt", "good") for p in trained]
    assert rejected == [p.replace("prompt", "bad") for p in trained]
    # another dataset's slice, or a whole split evaluated, leaves the training rows whole
    assert common.load_prompts(path, "train", held_out=("other.jsonl", held)) == [r["prompt"] for r in rows]
    assert len(common.load_prompts(path, "train", held_out=(path, "train"))) == len(rows)


def test_held_out_slices_fail_with_one_line(tmp_path):
    path = _write(tmp_path, [{"prompt": f"prompt {i}"} for i in range(4)])
    for split, held, fix in (
        ("test", None, "--eval-split 'train[-5%:]'"),
        ("train[5%", None, "write a slice as 'train[-5%:]'"),
        ("train", "train[:100%]", "hold out fewer"),
    ):
        with pytest.raises(SystemExit) as stop:
            common.load_prompts(path, split, held_out=held and (path, held))
        message = str(stop.value)
        assert message.startswith("error:") and "\n" not in message and fix in message, message


def test_dpo_trains_on_the_rows_an_eval_slice_leaves(tmp_path, builtin_path):
    """One DPO step on a .jsonl of built-in preference rows with --eval-split 'train[-8:]': the run evaluates the
    last 8 rows' prompts and trains on the rest (less --heldout-pairs)."""
    import datasets
    from conftest import read_run, run_script

    rows = datasets.load_from_disk(str(Path(builtin_path) / "data" / "preference"))
    rows = rows["train"] if isinstance(rows, datasets.DatasetDict) else rows
    path = _write(tmp_path, [dict(row) for row in rows.select(range(40))])
    run_script(
        "dpo.py",
        *("--dataset", path, "--offline-dataset", path, "--eval-split", "train[-8:]", "--eval-prompts", "8"),
        *("--total-steps", "1", "--mini-batch-size", "4", "--eval-every", "1", "--heldout-pairs", "4"),
        *("--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "run")),
        env={"OMP_NUM_THREADS": "1"},
    )
    folder, records = read_run(tmp_path / "run")
    assert records[0]["data/pairs"] + 4 == 40 - 8
    with open(folder / "samples.jsonl") as f:
        evaluated = [json.loads(line)["prompt"] for line in f if json.loads(line)["step"] == 0]
    assert evaluated == [row["prompt"] for row in rows.select(range(32, 40))]
