"""Every script end to end on real Anthropic HH text (../shared/data/hh-rlhf): a byte-level BPE tokenizer trained here
on the dialogues, a tiny GPT-2 policy and a tiny GPT-2 reward model with that tokenizer. Online runs sample from the
HH prompts; offline runs read the HH transcripts as preference rows. Stop strings "Human:" "Assistant:" are on.

The tiny policy is built to say "Human:" often (one token here: the tokenizer has it as an added token, and the
output layer is biased toward it), so a run whose stop strings did nothing would show full-length responses."""

import gzip
import json
import math

import pytest
from conftest import ROOT, read_run, run_script, train_bpe

HH_FILE = ROOT.parent / "shared" / "data" / "hh-rlhf" / "helpful-base-test.jsonl.gz"
N_TOKENIZER_ROWS, N_DATA_ROWS = 200, 32
MAX_NEW, MAX_PROMPT = 8, 64
STOP = ["--stop-strings", "Human:", "Assistant:"]


@pytest.fixture(scope="module")
def hh(tmp_path_factory):
    """A tokenizer trained on 200 HH rows (`tokenizer`; `human`: the id of "Human:"), a tiny policy and reward model
    saved with it (folders `policy`, `reward`), the first rows of the file as a .jsonl of HH transcripts {chosen,
    rejected} (`data`; `pairs`: how many of them are preference rows), and a folder for A-LoL's cache (`cache`)."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    assert HH_FILE.exists(), f"{HH_FILE} is missing: the HH end-to-end tests need ../shared/data beside the project"
    with gzip.open(HH_FILE, "rt") as f:
        rows = [json.loads(line) for _, line in zip(range(N_TOKENIZER_ROWS), f)]
    assert len(rows) == N_TOKENIZER_ROWS and all({"chosen", "rejected"} <= set(r) for r in rows)

    tokenizer = train_bpe([r[k] for r in rows for k in ("chosen", "rejected")], vocab_size=500)
    tokenizer.add_tokens(["Human:"])  # one token, so the tiny policy below can be made to say it
    human = tokenizer.convert_tokens_to_ids("Human:")
    assert len(tokenizer) <= 512 and tokenizer.eos_token_id != tokenizer.pad_token_id
    text = rows[0]["chosen"]
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text and human in tokenizer(text)["input_ids"]

    root = tmp_path_factory.mktemp("hh")
    ids = dict(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=32,
        n_layer=1,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    policy = GPT2LMHeadModel(GPT2Config(**ids, tie_word_embeddings=False))
    with torch.no_grad():  # hidden state ≈ a fixed direction u, and the "Human:" row of the output layer along it:
        u = torch.nn.functional.normalize(torch.randn(32), dim=0)  # p("Human:") ≈ e^6 / (e^6 + 511) ≈ 0.44
        policy.transformer.ln_f.weight.fill_(0.1)
        policy.transformer.ln_f.bias.copy_(u)
        policy.lm_head.weight[human] = 6.0 * u
    policy.save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    reward = GPT2ForSequenceClassification(GPT2Config(**ids, num_labels=1))
    reward.save_pretrained(root / "reward")
    tokenizer.save_pretrained(root / "reward")
    data = root / "hh.jsonl"
    data.write_text(
        "".join(json.dumps({"chosen": r["chosen"], "rejected": r["rejected"]}) + "\n" for r in rows[:N_DATA_ROWS])
    )
    heldout = root / "heldout.jsonl"  # other rows: A-LoL fits V_ref on prompts that no training row has
    heldout.write_text(
        "".join(
            json.dumps({"chosen": r["chosen"], "rejected": r["rejected"]}) + "\n"
            for r in rows[N_DATA_ROWS : 2 * N_DATA_ROWS]
        )
    )
    pairs = 0  # rows with one prompt before the last "\n\nAssistant:" and two non-empty replies (counted here)
    for r in rows[:N_DATA_ROWS]:
        (head_c, _, chosen), (head_r, _, rejected) = (r[k].rpartition("\n\nAssistant:") for k in ("chosen", "rejected"))
        pairs += bool(head_c) and head_c == head_r and bool(chosen.strip()) and bool(rejected.strip())
    assert pairs >= 16, pairs  # one rollout batch of prompts, and A-LoL's --value-prompts
    return dict(
        tokenizer=tokenizer,
        human=human,
        policy=str(root / "policy"),
        reward=str(root / "reward"),
        data=str(data),
        heldout=str(heldout),
        pairs=pairs,
        cache=str(root / "alol_cache"),
    )


def test_the_tiny_policy_says_human_and_the_tokenizer_reloads(hh):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hh["policy"])
    assert tokenizer.get_vocab() == hh["tokenizer"].get_vocab() and len(tokenizer) <= 512
    policy = AutoModelForCausalLM.from_pretrained(hh["policy"])
    prompt = tokenizer("\n\nHuman: How do I bake bread?\n\nAssistant:", return_tensors="pt")
    out = policy.generate(**prompt, do_sample=False, max_new_tokens=2, pad_token_id=tokenizer.pad_token_id)
    assert out[0, -2].item() == hh["human"]  # greedy: "Human:" at once
    with torch.no_grad():
        p_human = policy(**prompt).logits[0, -1].softmax(-1)[hh["human"]].item()
    assert 0.2 < p_human < 0.8  # sampled: often, not always


def _online(hh):
    return [
        "--model-name-or-path",
        hh["policy"],
        "--reward-model",
        hh["reward"],
        "--dataset",
        hh["data"],
        "--train-split",
        "train",
        "--eval-split",
        "train",
        "--total-episodes",
        "16",
        "--rollout-batch-size",
        "16",
        "--mini-batch-size",
        "8",
        "--update-epochs",
        "1",
        "--max-new-tokens",
        str(MAX_NEW),
        "--max-prompt-length",
        str(MAX_PROMPT),
        "--eval-prompts",
        "8",
        "--eval-every",
        "1",
        *STOP,
    ]


def _offline(hh):
    return [
        "--model-name-or-path",
        hh["policy"],
        "--reward-model",
        hh["reward"],
        "--dataset",
        hh["data"],
        "--offline-dataset",
        hh["data"],
        "--eval-split",
        "train",
        "--max-new-tokens",
        str(MAX_NEW),
        "--max-prompt-length",
        str(MAX_PROMPT),
        "--eval-prompts",
        "8",
        *STOP,
    ]


RUNS = {
    "ppo": ("ppo.py", _online, []),
    "apa": ("apa.py", _online, []),
    "awr": ("awr.py", _online, []),
    "apa_offline": ("apa.py", _offline, "--offline-epochs 1 --mini-batch-size 32 --eval-every 1".split()),
    "ilql": (
        "ilql.py",
        _offline,
        "--offline-epochs 1 --mini-batch-size 16 --eval-betas 1 --eval-every 1 --log-every 2".split(),
    ),
    "alol": (
        "alol.py",
        _offline,
        (
            "--algorithm a_lol --total-steps 2 --mini-batch-size 8 --value-split train --value-prompts 16 "
            "--value-epochs 1 --eval-every 2"
        ).split(),
    ),  # --dataset: the held-out rows (the runs fixture)
}


@pytest.fixture(scope="module")
def runs(hh, tmp_path_factory):
    """Every run of RUNS, two at a time (this file's wall time; each run is mostly imports on one core)."""
    from concurrent.futures import ThreadPoolExecutor

    def launch(name):
        script, flags, extra = RUNS[name]
        out = tmp_path_factory.mktemp(name)
        extra = extra + (["--cache-dir", hh["cache"], "--dataset", hh["heldout"]] if script == "alol.py" else [])
        return (
            name,
            out,
            run_script(script, *flags(hh), *extra, "--output-dir", str(out), check=False, env={"OMP_NUM_THREADS": "1"}),
        )

    with ThreadPoolExecutor(max_workers=2) as pool:
        return {name: (out, proc) for name, out, proc in pool.map(launch, RUNS)}


@pytest.mark.parametrize("name", list(RUNS))
def test_script_runs_on_hh_text(hh, runs, name):
    script, flags, _ = RUNS[name]
    output_dir, proc = runs[name]
    assert proc.returncode == 0 and "done in" in proc.stdout, (
        f"{' '.join(proc.args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    run, records = read_run(output_dir)
    steps = [r["step"] for r in records]
    assert steps[0] == 0 and steps[-1] > 0 and steps == sorted(steps), steps
    assert all(math.isfinite(v) for r in records for v in r.values())
    assert any("loss" in k for r in records for k in r), records  # policy/loss, value/loss, loss/q, ... (finite)
    # the stop strings: responses end at "Human:" long before MAX_NEW tokens (the policy says it ~44% of the time)
    if "--total-episodes" in flags(hh):  # online: the rollouts too
        rollout = [r for r in records if "rollout/response_length" in r]
        assert rollout and all(
            r["rollout/response_length"] < 4 and r["rollout/no_eos_fraction"] <= 0.25 for r in rollout
        ), rollout
    lengths = [v for r in records for k, v in r.items() if k.startswith("eval/") and k.endswith("response_length")]
    assert lengths and all(v < 4 for v in lengths), records
    if script == "alol.py":  # greedy: "Human:" first, cut to the one token a response keeps
        assert all(v == 1 for v in lengths), lengths
        assert records[0]["data/rows"] == hh["pairs"]  # the HH rows, as preference rows: their chosen replies
    if script == "ilql.py":
        assert f"{2 * hh['pairs']} rows" in proc.stdout  # chosen (reward 1) and rejected (reward 0) replies
    # the saved policy reloads with the tokenizer and generates
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run / "policy")
    assert tokenizer.get_vocab() == hh["tokenizer"].get_vocab()
    policy = AutoModelForCausalLM.from_pretrained(run / "policy")
    assert policy.config.vocab_size == len(tokenizer)
    prompt = tokenizer("\n\nHuman: Hello\n\nAssistant:", return_tensors="pt")
    out = policy.generate(**prompt, do_sample=False, max_new_tokens=2, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 2
