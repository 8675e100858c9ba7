"""Every script end to end on tiny random models of the architectures users bring (Llama, GPT-NeoX / Pythia, GPT-J,
Qwen2 with a chat template, run with and without --chat-template), saved with `save_pretrained` in the layout real
checkpoints have (config.json, model.safetensors, generation_config.json, tokenizer files), with GPT-2's real 50k BPE
tokenizer
(../shared/data/tokenizers/gpt2) and HH rows (../shared/data/hh-rlhf), stop strings "Human:" "Assistant:" on.

Vocabularies are padded past the tokenizer as released checkpoints do (Pythia 50,304 rows, GPT-J 50,400), the Qwen2
model ties its embeddings and ends turns with <|im_end|>, and reward models of another architecture and tokenizer (a
small BPE trained here) score through the decode / re-encode path, one of them in its own chat template; one run is
stopped by SIGTERM and resumed.

Each tiny policy is made to say "Human:" often (the blocks' output projections zeroed, every embedding row ≈ one
direction u but, with an untied head, that of "Human" (v), so the last hidden state is u or v whatever the context,
and the output rows of "Human" and ":" point along u and v): a run whose stop strings did nothing would show
full-length responses."""

import gzip
import json
import math
import shutil
import time
from pathlib import Path

import pytest
from conftest import ROOT, assert_resume_reproduces, read_run, run_script, train_bpe

DATA = ROOT.parent / "shared" / "data"
GPT2_DIR = DATA / "tokenizers" / "gpt2"
HH_FILE = DATA / "hh-rlhf" / "helpful-base-test.jsonl.gz"
N_ROWS, MAX_NEW, MAX_PROMPT = 24, 8, 48
STOP = ["--stop-strings", "Human:", "Assistant:"]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A Python reward that scores nothing (0.0) and writes what it was given to $ARCH_REWARD_LOG: added to a reward model,
# it shows which texts the model scored.
SPY = """import json, os
def spy(prompts, responses):
    if os.environ.get("ARCH_REWARD_LOG"):
        with open(os.environ["ARCH_REWARD_LOG"], "a") as f:
            f.write(json.dumps({"prompts": prompts, "responses": responses}) + "\\n")
    return [0.0] * len(prompts)
def length(prompts, responses):
    return [len(r) / 10 for r in responses]
"""
# The chat reward model's own template: another format than the policy's ChatML, on another tokenizer
RM_TEMPLATE = (
    "{% for message in messages %}{{ '### ' + message['role'] + ': ' + message['content'] + '<|endoftext|>' }}"
    "{% endfor %}"
)
# Llama 3's template shape (BOS written by the template, the turn ended by EOS) in plain-text role headers
LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] + ':\n' + message['content'] + "
    "eos_token }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant:\n' }}{% endif %}"
)
CHECKPOINTS = (
    "llama",
    "llama_chat",
    "neox",
    "gptj",
    "qwen2",
    "rm_neox_bpe",
    "rm_gptj_bpe",
    "rm_neox_gpt2",
    "rm_neox_chat",
)
RUN_STATS = {}  # name -> (wall s, CPU s, peak RSS MiB), printed by the last test


def _chatty(model, say):
    """Make a random causal LM say `say` = ("Human", ":") whatever the prompt (module docstring). Untied: after any
    token but "Human", "Human" ≈ 76%; after "Human", ":" ≈ 96% (greedy says "Human:" at once). Tied (one matrix
    cannot also map "Human" to ":"): each of the two ≈ 40% after any token."""
    import torch

    hidden = model.config.get_text_config().hidden_size
    u, v = torch.randn(2, hidden)
    u = torch.nn.functional.normalize(u - u.mean(), dim=0)
    v = torch.nn.functional.normalize(v - v.mean() - (v @ u) * u, dim=0)  # zero mean, orthogonal to u
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    root = math.sqrt(hidden)  # zero mean, unit norm: LayerNorm and RMSNorm both map u to √h·u (v to √h·v)
    with torch.no_grad():
        embed.copy_(u + 0.01 * torch.randn_like(embed))
        for name, module in model.named_modules():  # the blocks add nothing to the residual stream
            if name.rsplit(".", 1)[-1] in ("o_proj", "down_proj", "dense", "dense_4h_to_h", "out_proj", "fc_out"):
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()
        if head.data_ptr() == embed.data_ptr():  # logits √h·u·row: 11.5 + √h for both, √h for rows ≈ u
            for token in say:
                head[token] = (11.5 / root + 1) * u
        else:  # an untied head's random rows give logits ≈ 0; "Human" is read as v, and v is what says ":"
            embed[say[0]] = v
            head[say[0]] = 12 / root * u
            head[say[1]] = 14 / root * v
    return model


def _save(model, tokenizer, path, generation_eos=None):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if generation_eos is not None:  # Qwen2 instruct: generation_config.json stops at <|im_end|> or <|endoftext|>
        config = json.loads((path / "generation_config.json").read_text())
        (path / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": generation_eos}))
    return str(path)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_zoo(tmp_path_factory.mktemp("zoo"))


def build_zoo(root):
    """Checkpoints: policies `llama`, `llama_chat` (the same with a chat template), `neox`, `gptj`, `qwen2`; reward
    models `rm_neox_bpe`, `rm_gptj_bpe` (a small BPE trained here), `rm_neox_gpt2` (GPT-2's tokenizer, Pythia's
    padded vocabulary), `rm_neox_chat` (the small BPE with its own chat template); `data` (HH rows {chosen,
    rejected}), `chat_data` / `chat_heldout` (the same dialogues as chat messages), `pairs` (how many are preference
    rows), `root` (the folder, with arch_rewards.py)."""
    import torch
    from tokenizers import Tokenizer, processors
    from transformers import (
        AutoTokenizer,
        GPTJConfig,
        GPTJForCausalLM,
        GPTJForSequenceClassification,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        GPTNeoXForSequenceClassification,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    assert (GPT2_DIR / "tokenizer.json").exists(), (
        f"{GPT2_DIR} is missing: these tests need GPT-2's tokenizer in "
        f"../shared/data/tokenizers/gpt2 beside the project"
    )
    assert HH_FILE.exists(), f"{HH_FILE} is missing: these tests need ../shared/data/hh-rlhf beside the project"
    with gzip.open(HH_FILE, "rt") as f:
        rows = [json.loads(line) for _, line in zip(range(2 * N_ROWS), f)]
    rows, heldout_rows = rows[:N_ROWS], rows[N_ROWS:]
    data = root / "hh.jsonl"
    data.write_text("".join(json.dumps({"chosen": r["chosen"], "rejected": r["rejected"]}) + "\n" for r in rows))
    heldout = root / "heldout.jsonl"  # other dialogues: A-LoL fits V_ref on prompts no training row has
    heldout.write_text(
        "".join(json.dumps({"chosen": r["chosen"], "rejected": r["rejected"]}) + "\n" for r in heldout_rows)
    )
    import common
    import formats

    chat_data, chat_heldout = root / "hh_messages.jsonl", root / "heldout_messages.jsonl"  # TRL's conversational rows

    def conversation(dialogue):
        return [
            *common.prompt_messages(formats.split_hh(dialogue)[0]),
            {"role": "assistant", "content": formats.split_hh(dialogue)[1].strip()},
        ]

    chat_data.write_text(
        "".join(json.dumps({k: conversation(r[k]) for k in ("chosen", "rejected")}) + "\n" for r in rows)
    )
    chat_heldout.write_text(
        "".join(json.dumps({"messages": conversation(r["chosen"])[:-1]}) + "\n" for r in heldout_rows)
    )
    pairs = 0  # rows with one prompt before the last "\n\nAssistant:" and two non-empty replies
    for r in rows:
        (head_c, _, chosen), (head_r, _, rejected) = (r[k].rpartition("\n\nAssistant:") for k in ("chosen", "rejected"))
        pairs += bool(head_c) and head_c == head_r and bool(chosen.strip()) and bool(rejected.strip())
    assert pairs >= 8, pairs
    (root / "arch_rewards.py").write_text(SPY)

    gpt2 = AutoTokenizer.from_pretrained(GPT2_DIR)
    assert len(gpt2) == 50257 and gpt2.pad_token is None  # as released: no pad token
    say = [gpt2.convert_tokens_to_ids("Human"), gpt2.convert_tokens_to_ids(":")]
    assert gpt2.decode(say) == "Human:"
    # Llama 3's layout on GPT-2's BPE: <|begin_of_text|> before every text (its post-processor), <|end_of_text|> ends
    llama_tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(gpt2.backend_tokenizer.to_str()),
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
    )
    bos = llama_tok.bos_token_id
    llama_tok.backend_tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                special_tokens=[("<|begin_of_text|>", bos)],
            ),
        ]
    )
    assert llama_tok("Hello world")["input_ids"] == [bos, 15496, 995]
    qwen = AutoTokenizer.from_pretrained(GPT2_DIR)  # Qwen2 instruct's special tokens and roles, on GPT-2's BPE
    qwen.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    qwen.eos_token, qwen.pad_token = "<|im_end|>", "<|endoftext|>"
    small = train_bpe([r[k] for r in rows for k in ("chosen", "rejected")], vocab_size=400)  # the RMs' own

    eos = {"bos_token_id": gpt2.eos_token_id, "eos_token_id": gpt2.eos_token_id}
    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(llama_tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            bos_token_id=bos,
            eos_token_id=llama_tok.eos_token_id,
        )
    )
    neox = GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=50304,
            hidden_size=32,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            rotary_pct=0.25,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            **eos,
        )
    )
    gptj = GPTJForCausalLM(
        GPTJConfig(
            vocab_size=50400,
            n_embd=32,
            n_layer=1,
            n_head=2,
            rotary_dim=8,
            n_positions=256,
            tie_word_embeddings=False,
            **eos,
        )
    )
    im_end, endoftext = qwen.convert_tokens_to_ids("<|im_end|>"), qwen.convert_tokens_to_ids("<|endoftext|>")
    qwen2 = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=50304,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=32768,
            tie_word_embeddings=True,
            bos_token_id=endoftext,
            eos_token_id=im_end,
            pad_token_id=endoftext,
        )
    )
    paths = {
        "root": str(root),
        "data": str(data),
        "heldout": str(heldout),
        "pairs": pairs,
        "chat_data": str(chat_data),
        "chat_heldout": str(chat_heldout),
    }
    paths["llama"] = _save(_chatty(llama, say), llama_tok, root / "llama")
    assert AutoTokenizer.from_pretrained(root / "llama")("Hello")["input_ids"][0] == bos
    shutil.copytree(root / "llama", root / "llama_chat")
    llama_tok.chat_template = LLAMA_TEMPLATE
    llama_tok.save_pretrained(root / "llama_chat")
    paths["llama_chat"] = str(root / "llama_chat")
    for name, model in (("neox", neox), ("gptj", gptj)):
        paths[name] = _save(_chatty(model, say), gpt2, root / name)
    paths["qwen2"] = _save(_chatty(qwen2, say), qwen, root / "qwen2", generation_eos=[im_end, endoftext])
    # the chat template where released Qwen2 checkpoints keep it: in tokenizer_config.json
    config_file = root / "qwen2" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "chat_template": CHATML}, indent=2))
    (root / "qwen2" / "chat_template.jinja").unlink(missing_ok=True)
    assert AutoTokenizer.from_pretrained(root / "qwen2").chat_template == CHATML

    score = {"num_labels": 1, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    small_ids = {
        "vocab_size": len(small),
        "pad_token_id": small.pad_token_id,
        "bos_token_id": small.eos_token_id,
        "eos_token_id": small.eos_token_id,
    }
    paths["rm_neox_bpe"] = _save(
        GPTNeoXForSequenceClassification(
            GPTNeoXConfig(**score, **small_ids, intermediate_size=64, max_position_embeddings=512)
        ),
        small,
        root / "rm_neox_bpe",
    )
    chat_small = train_bpe([r[k] for r in rows for k in ("chosen", "rejected")], vocab_size=400)
    chat_small.chat_template = RM_TEMPLATE
    paths["rm_neox_chat"] = _save(
        GPTNeoXForSequenceClassification(
            GPTNeoXConfig(**score, **small_ids, intermediate_size=64, max_position_embeddings=512)
        ),
        chat_small,
        root / "rm_neox_chat",
    )
    gptj_score = {"n_embd": 32, "n_layer": 1, "n_head": 2, "rotary_dim": 8, "n_positions": 512, "num_labels": 1}
    paths["rm_gptj_bpe"] = _save(
        GPTJForSequenceClassification(GPTJConfig(**gptj_score, **small_ids)), small, root / "rm_gptj_bpe"
    )
    paths["rm_neox_gpt2"] = _save(
        GPTNeoXForSequenceClassification(
            GPTNeoXConfig(**score, vocab_size=50304, intermediate_size=64, max_position_embeddings=256, **eos)
        ),
        gpt2,
        root / "rm_neox_gpt2",
    )
    for name in ("llama", "neox", "gptj", "qwen2", "rm_neox_bpe"):  # the layout of a released checkpoint
        files = {p.name for p in (root / name).iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files, files
        assert name.startswith("rm_") or "generation_config.json" in files, files
    return paths


def _online(policy, reward):
    return [
        "--model-name-or-path",
        policy,
        "--reward-model",
        *reward,
        "--dataset",
        "DATA",
        "--train-split",
        "train",
        "--eval-split",
        "train",
        "--total-episodes",
        "16",
        "--rollout-batch-size",
        "8",
        "--mini-batch-size",
        "4",
        "--max-new-tokens",
        str(MAX_NEW),
        "--max-prompt-length",
        str(MAX_PROMPT),
        "--eval-prompts",
        "8",
        "--eval-every",
        "1",
        *STOP,
        "--forward-batch-size",
        "8",
    ]  # one reward call per rollout: the spy's batches are the logged ones


def _offline(policy, reward):
    return [
        "--model-name-or-path",
        policy,
        "--reward-model",
        *reward,
        "--dataset",
        "DATA",
        "--offline-dataset",
        "DATA",
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


# name: (script, policy, arguments with the checkpoints' names and DATA for the HH rows' file)
RUNS = {
    "ppo_llama": (
        "ppo.py",
        "llama",
        _online("llama", ["rm_neox_bpe", "arch_rewards:spy"]) + ["--update-epochs", "1", "--unfrozen-layers", "1"],
    ),
    "apa_neox": (
        "apa.py",
        "neox",
        _online("neox", ["rm_neox_gpt2", "arch_rewards:length"]) + ["--reward-weights", "1", "0.5"],
    ),
    "awr_gptj": (
        "awr.py",
        "gptj",
        _offline("gptj", ["rm_neox_bpe", "arch_rewards:spy"])
        + "--offline-epochs 1 --mini-batch-size 8 --eval-every 1".split(),
    ),
    "ilql_qwen2": (
        "ilql.py",
        "qwen2",
        _offline("qwen2", ["arch_rewards:length"])
        + "--offline-epochs 1 --mini-batch-size 8 --eval-betas 1 --eval-every 1 --log-every 1".split(),
    ),
    "alol_llama": (
        "alol.py",
        "llama",
        _offline("llama", ["rm_gptj_bpe"])
        + (
            "--algorithm a_lol --total-steps 2 --mini-batch-size 4 --dataset HELDOUT --value-split train "
            "--value-prompts 8 --value-epochs 1 --eval-every 2"
        ).split(),
    ),
    # --chat-template: ChatML prompts for the policy, the reward model's own template for (prompt, response)
    "ppo_qwen2_chat": (
        "ppo.py",
        "qwen2",
        _online("qwen2", ["rm_neox_chat", "arch_rewards:spy"]) + ["--update-epochs", "1", "--chat-template"],
    ),
    "grpo_qwen2_chat": (
        "grpo.py",
        "qwen2",
        _online("qwen2", ["rm_neox_chat", "arch_rewards:spy"]) + ["--chat-template"],
    ),
    "alol_llama_chat": (
        "alol.py",
        "llama_chat",
        [
            "--model-name-or-path",
            "llama_chat",
            "--reward-model",
            "rm_neox_chat",
            "--offline-dataset",
            "CHAT_DATA",
            "--dataset",
            "CHAT_HELDOUT",
            "--eval-split",
            "train",
            "--max-new-tokens",
            str(MAX_NEW),
            "--max-prompt-length",
            str(MAX_PROMPT),
            "--eval-prompts",
            "8",
            *STOP,
            "--algorithm",
            "a_lol",
            "--total-steps",
            "2",
            "--mini-batch-size",
            "4",
            "--value-split",
            "train",
            "--value-prompts",
            "8",
            "--value-epochs",
            "1",
            "--eval-every",
            "2",
            "--chat-template",
        ],
    ),
    # LoRA on the architectures' own layer names, with gradient checkpointing and eager attention
    "ppo_neox_lora": (
        "ppo.py",
        "neox",
        _online("neox", ["rm_neox_gpt2"])
        + (
            "--update-epochs 1 --lora-r 8 --lora-target-modules query_key_value dense --learning-rate 1e-3 "
            "--gradient-checkpointing --attn-implementation eager"
        ).split(),
    ),
    "alol_llama_lora": (
        "alol.py",
        "llama",
        _offline("llama", ["rm_gptj_bpe"])
        + (
            "--algorithm a_lol --total-steps 2 --mini-batch-size 4 --dataset HELDOUT --value-split train "
            "--value-prompts 8 --value-epochs 1 --eval-every 2 --lora-r 8 --lora-target-modules o_proj down_proj "
            "--learning-rate 1e-3"
        ).split(),
    ),  # the blocks' outputs: _chatty
}


def _args(zoo, name):
    """RUNS[name]'s arguments with the checkpoints' folders in place of their names."""
    files = {
        "DATA": zoo["data"],
        "HELDOUT": zoo["heldout"],
        "CHAT_DATA": zoo["chat_data"],
        "CHAT_HELDOUT": zoo["chat_heldout"],
    }
    return [files[a] if a in files else zoo[a] if a in CHECKPOINTS else a for a in RUNS[name][2]]


@pytest.fixture(scope="module")
def runs(zoo, tmp_path_factory):
    """Every run of RUNS, two at a time, one thread each; {name: (output folder, process, spy log)}."""
    jobs, outs, logs = {}, {}, {}
    for name, (script, _, _) in RUNS.items():
        outs[name] = tmp_path_factory.mktemp(name)
        logs[name] = outs[name] / "spy.jsonl"
        extra = ["--cache-dir", str(outs[name] / "cache")] if script == "alol.py" else []
        jobs[name] = (
            script,
            [*_args(zoo, name), *extra, "--output-dir", str(outs[name] / "out")],
            {"env": {"PYTHONPATH": zoo["root"], "ARCH_REWARD_LOG": str(logs[name])}},
        )
    procs = _run_measured(jobs)
    return {name: (outs[name] / "out", procs[name], logs[name]) for name in RUNS}


def _run_measured(jobs: dict, workers=2):
    """run_pairs (conftest) with each run's wall time, CPU time and peak RSS kept in RUN_STATS: os.wait4 reaps one
    process and returns its own resource usage, where getrusage(RUSAGE_CHILDREN) would mix two runs that overlap."""
    import os
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    def launch(name):
        script, args, kwargs = jobs[name]
        env = {**os.environ, "OMP_NUM_THREADS": "1", **kwargs["env"]}
        with open(f"{args[-1]}.stdout", "w+") as out, open(f"{args[-1]}.stderr", "w+") as err:
            start = time.time()
            proc = subprocess.Popen(
                [sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env, stdout=out, stderr=err, text=True
            )
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            cpu, peak_mib = usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # ru_maxrss: KiB on Linux
            RUN_STATS[name] = (time.time() - start, cpu, peak_mib)
            out.seek(0)
            err.seek(0)
            return name, subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(pool.map(launch, jobs))


def _check_common(zoo, name, output_dir, proc):
    policy_name = RUNS[name][1]
    assert proc.returncode == 0 and "done in" in proc.stdout, (
        f"{' '.join(proc.args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    run, records = read_run(output_dir)
    steps = [r["step"] for r in records]
    assert steps[0] == 0 and steps == sorted(steps), steps
    assert all(math.isfinite(v) for r in records for v in r.values()), records
    losses = [v for r in records for k, v in r.items() if "loss" in k and "learning_rate" not in k]
    assert losses and any(v != 0 for v in losses), records
    # the stop strings cut responses (the policies say "Human:" often; the budget is MAX_NEW tokens)
    lengths = [v for r in records for k, v in r.items() if k.endswith("response_length")]
    assert lengths and all(v < MAX_NEW - 1 for v in lengths), lengths
    # the saved policy: the same architecture, the same tensors (a tied head stays tied), changed by training
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    before, after = load_file(f"{zoo[policy_name]}/model.safetensors"), load_file(f"{run}/policy/model.safetensors")
    assert set(before) == set(after), set(before) ^ set(after)
    assert all(before[k].shape == after[k].shape and before[k].dtype == after[k].dtype for k in before)
    assert any(not torch.equal(before[k], after[k]) for k in before), "the policy did not change"
    config, original = AutoConfig.from_pretrained(run / "policy"), AutoConfig.from_pretrained(zoo[policy_name])
    assert (config.model_type, config.vocab_size, config.tie_word_embeddings) == (
        original.model_type,
        original.vocab_size,
        original.tie_word_embeddings,
    )
    tokenizer = AutoTokenizer.from_pretrained(run / "policy")
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(zoo[policy_name]).get_vocab()
    model = AutoModelForCausalLM.from_pretrained(run / "policy")
    prompt = tokenizer("\n\nHuman: Hello\n\nAssistant:", return_tensors="pt")
    out = model.generate(**prompt, do_sample=False, max_new_tokens=2, pad_token_id=tokenizer.eos_token_id)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 2 and tokenizer.decode(out[0, -2:]) != ""
    return run, records, tokenizer


def _rescore(reward_path, log, chat=False):
    """Each batch the spy saw, scored here by the reward model at `reward_path` on prompt + response (`chat`: on its
    chat template of the prompt's turns and the response), cut on the left to its context: [batch means]."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import common

    tokenizer = AutoTokenizer.from_pretrained(reward_path, truncation_side="left")
    model = AutoModelForSequenceClassification.from_pretrained(reward_path).eval()
    means = []
    for line in log.read_text().splitlines():
        batch = json.loads(line)
        pairs = list(zip(batch["prompts"], batch["responses"]))
        if chat:
            texts = [
                tokenizer.apply_chat_template(
                    [*common.prompt_messages(p), {"role": "assistant", "content": r}], tokenize=False
                )
                for p, r in pairs
            ]
        else:
            texts = [p + r for p, r in pairs]
        enc = tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            add_special_tokens=not chat,
            truncation=True,
            max_length=model.config.max_position_embeddings,
        )
        with torch.no_grad():
            means.append(model(**enc).logits[:, 0].mean().item())
    return means


def test_a_truncated_prompt_keeps_the_bos_token(zoo):
    """Llama's tokenizer starts every text with <|begin_of_text|>: a prompt cut on the left keeps it first (the model
    never saw a text without it); GPT-2's adds nothing, and its prompts are cut to their last tokens."""
    import common

    text = "\n\nHuman: " + "tell me more " * 20 + "\n\nAssistant:"
    for name in ("llama", "neox"):
        tokenizer = common.load_tokenizer(zoo[name])
        full = tokenizer(text)["input_ids"]
        (row,), n_truncated = common.encode_prompts(
            tokenizer, [text], max_prompt_length=16, max_new_tokens=8, context=256
        )
        assert n_truncated == 1 and len(row) == 16, row
        if name == "llama":
            assert full[0] == row[0] == tokenizer.bos_token_id and row[1:] == full[-15:], (full, row)
        else:
            assert full[0] != tokenizer.bos_token_id and row == full[-16:], (full, row)


def test_ppo_llama_scored_by_a_neox_reward_model_with_another_tokenizer(zoo, runs, tmp_path):
    output_dir, proc, log = runs["ppo_llama"]
    import torch

    run, records, _ = _check_common(zoo, "ppo_llama", output_dir, proc)
    assert "the value model is initialised from the policy" in proc.stdout  # the reward model reads other ids
    rollouts = [r for r in records if "rollout/score" in r]
    assert len(rollouts) == 2 and all(r["rollout/score_std"] > 0 for r in rollouts), rollouts
    assert all(r["rollout/no_eos_fraction"] < 1 for r in rollouts), rollouts  # ended by a stop string
    # rollout/score is the NeoX model's score of the decoded, re-encoded texts (the spy adds 0.0)
    means = _rescore(zoo["rm_neox_bpe"], log)
    for r in rollouts:
        assert min(abs(r["rollout/score"] - m) for m in means) < 1e-4, (r["rollout/score"], means)
    from safetensors.torch import load_file
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(run / "value").model_type == "llama"  # the value model: the policy's trunk
    # --unfrozen-layers 1: Llama's lower block and embeddings stay as they were; the top block and the head train
    before, after = load_file(f"{zoo['llama']}/model.safetensors"), load_file(f"{run}/policy/model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(k.startswith(("model.embed_tokens.", "model.layers.0.")) for k in changed), changed
    assert "lm_head.weight" in changed and any(k.startswith("model.layers.1.") for k in changed), changed
    # stopped by SIGTERM after the first iteration and resumed: every logged number as in the uninterrupted run
    args = [*_args(zoo, "ppo_llama")]
    start = time.time()
    assert_resume_reproduces("ppo.py", args, records, tmp_path, env={"OMP_NUM_THREADS": "1", "PYTHONPATH": zoo["root"]})
    RUN_STATS["ppo_llama stop + resume"] = (time.time() - start, None, None)


def test_apa_online_on_neox_with_a_padded_vocabulary(zoo, runs):
    output_dir, proc, _ = runs["apa_neox"]
    run, records, _ = _check_common(zoo, "apa_neox", output_dir, proc)
    assert "initialised from the policy" not in proc.stdout  # same vocabulary: the value model is the reward model's
    rollouts = [r for r in records if "rollout/score" in r]
    assert len(rollouts) == 2 and rollouts[0]["rollout/score"] != rollouts[1]["rollout/score"], rollouts
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(run / "value").model_type == "gpt_neox"


def test_awr_offline_on_gptj_scored_by_a_neox_reward_model(zoo, runs):
    output_dir, proc, log = runs["awr_gptj"]
    _, records, _ = _check_common(zoo, "awr_gptj", output_dir, proc)
    assert "the value model is initialised from the policy" in proc.stdout
    evals = [r for r in records if "eval/reward" in r]
    assert len(evals) == 2 and evals[0]["eval/kl_to_ref"] == 0 != evals[1]["eval/kl_to_ref"], evals
    # eval/reward (one batch of 8 prompts) is the NeoX model's score of the decoded, re-encoded texts
    means = _rescore(zoo["rm_neox_bpe"], log)
    assert len(means) == 2 and all(abs(r["eval/reward"] - m) < 1e-4 for r, m in zip(evals, means)), (evals, means)


def test_ilql_on_qwen2_with_a_chat_template_as_raw_text(zoo, runs):
    output_dir, proc, _ = runs["ilql_qwen2"]
    run, records, tokenizer = _check_common(zoo, "ilql_qwen2", output_dir, proc)
    assert f"{2 * zoo['pairs']} rows" in proc.stdout  # chosen (reward 1) and rejected (reward 0) replies
    assert records[-1]["step"] == 2 * zoo["pairs"] // 8  # one epoch of batches of 8
    assert tokenizer.chat_template == CHATML and tokenizer.eos_token == "<|im_end|>"
    saved, original = (
        json.loads((path / "generation_config.json").read_text()) for path in (run / "policy", Path(zoo["qwen2"]))
    )
    assert (
        saved["eos_token_id"]
        == original["eos_token_id"]
        == tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    )
    rewards = [v for r in records for k, v in r.items() if k.startswith("eval/") and k.endswith("reward")]
    assert rewards and all(v > 0 for v in rewards), records  # length / 10 of non-empty responses
    # the saved LM (tied head) and its ILQL heads decode again as the run's final evaluation did
    args = _args(zoo, "ilql_qwen2")
    at = args.index("--model-name-or-path")
    args[at : at + 2] = ["--checkpoint", str(run / "policy")]
    start = time.time()
    proc = run_script(
        "ilql.py",
        "--eval-only",
        *args,
        "--output-dir",
        str(output_dir.parent / "eval_only"),
        env={"OMP_NUM_THREADS": "1", "PYTHONPATH": zoo["root"]},
    )
    RUN_STATS["ilql_qwen2 --eval-only"] = (time.time() - start, None, None)
    _, reloaded = read_run(output_dir.parent / "eval_only")
    final = {k: v for k, v in records[-1].items() if k.startswith("eval/")}
    assert final and all(reloaded[0][k] == pytest.approx(v, abs=1e-4) for k, v in final.items()), (final, reloaded)


def test_alol_on_llama_scored_by_a_gptj_reward_model(zoo, runs):
    output_dir, proc, _ = runs["alol_llama"]
    _, records, _ = _check_common(zoo, "alol_llama", output_dir, proc)
    assert records[0]["data/rows"] == zoo["pairs"]
    assert records[-1]["step"] == 2


def test_ppo_qwen2_with_chat_templates_for_the_policy_and_the_reward_model(zoo, runs):
    """--chat-template: the policy reads ChatML prompts; the reward model, with another tokenizer and template, scores
    its own template of (the HH dialogue as messages, the response); reward functions get the prompts as given."""
    import common

    output_dir, proc, log = runs["ppo_qwen2_chat"]
    _, records, _ = _check_common(zoo, "ppo_qwen2_chat", output_dir, proc)
    batches = [json.loads(line) for line in log.read_text().splitlines()]
    hh_prompts = set(common.load_prompts(zoo["data"], "train"))
    assert batches and all(p in hh_prompts for b in batches for p in b["prompts"])  # HH text, not ChatML
    rollouts = [r for r in records if "rollout/score" in r]
    means = _rescore(zoo["rm_neox_chat"], log, chat=True)
    assert len(rollouts) == 2 and all(r["rollout/score_std"] > 0 for r in rollouts), rollouts
    for r in rollouts:
        assert min(abs(r["rollout/score"] - m) for m in means) < 1e-4, (r["rollout/score"], means)


def test_grpo_qwen2_with_chat_templates_samples_groups_of_one_prompt(zoo, runs):
    """grpo.py under --chat-template: ChatML prompts for the policy, the reward model's own template; each group of 4
    responses answers one prompt (the reward function sees each prompt 4 times in a row)."""
    import common

    output_dir, proc, log = runs["grpo_qwen2_chat"]
    _, records, _ = _check_common(zoo, "grpo_qwen2_chat", output_dir, proc)
    batches = [json.loads(line) for line in log.read_text().splitlines()]
    hh_prompts = set(common.load_prompts(zoo["data"], "train"))
    assert batches and all(p in hh_prompts for b in batches for p in b["prompts"])  # HH text, not ChatML
    prompts = [b["prompts"] for b in batches]
    grouped = [p for p in prompts if len(p) == 8 and all(len(set(p[i : i + 4])) == 1 for i in (0, 4))]
    assert len(grouped) == 2, prompts  # the two rollouts; the evaluations' 8 prompts are 8 different ones
    means = _rescore(zoo["rm_neox_chat"], log, chat=True)
    scored = [r for r in records if "rollout/score" in r]
    assert len(scored) == 2
    for r in scored:
        assert min(abs(r["rollout/score"] - m) for m in means) < 1e-4, (r["rollout/score"], means)


def test_alol_on_llama_with_a_template_and_chat_messages(zoo, runs):
    """Conversational rows ({chosen, rejected} message lists, {messages} prompts) under --chat-template; the cache key
    holds the template."""
    output_dir, proc, _ = runs["alol_llama_chat"]
    _, records, _ = _check_common(zoo, "alol_llama_chat", output_dir, proc)
    assert records[0]["data/rows"] == zoo["pairs"] and records[-1]["step"] == 2
    (entry,) = (output_dir.parent / "cache").glob("*.json")
    assert json.loads(entry.read_text())["key"]["chat_template"] == LLAMA_TEMPLATE


@pytest.mark.parametrize(
    "name, adapted",
    [("ppo_neox_lora", ("query_key_value", "attention.dense")), ("alol_llama_lora", ("o_proj", "down_proj"))],
)
def test_lora_on_real_layer_names(zoo, runs, name, adapted):
    """A LoRA adapter on the architecture's own layers, by name: the merged policy differs from the SFT one in those
    weights only, by a matrix of rank ≤ r; the adapter folder names them. (The blocks' output layers: _chatty zeroes
    them, so an adapter before them would get no gradient.)"""
    import torch
    from safetensors.torch import load_file

    output_dir, proc, _ = runs[name]
    run, _, _ = _check_common(zoo, name, output_dir, proc)
    before, after = load_file(f"{zoo[RUNS[name][1]]}/model.safetensors"), load_file(f"{run}/policy/model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(".weight") and any(a in k for a in adapted) for k in changed), changed
    for k in changed:
        # rank ≤ r, counting singular values above 1e-3 of the largest: the rest is rounding in W + ΔW − W
        assert torch.linalg.matrix_rank((after[k] - before[k]).float(), rtol=1e-3) <= 8, k
    targets = json.loads((run / "policy" / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert sorted(targets) == sorted(a.split(".")[-1] for a in adapted)


def test_run_costs(runs):
    """Each run's wall time, CPU time and peak RSS (shown with -rP)."""
    for name, (wall, cpu, rss) in RUN_STATS.items():
        print(f"{name}: {wall:.1f} s" + (f" ({cpu:.1f} s CPU), peak RSS {rss:.0f} MiB" if rss else ""))
        assert rss is None or rss < 4096, (name, rss)
