"""Memory at real sizes: LoRA adapters in every script (merged and adapter checkpoints, π_ref as the policy
with its adapter off, ZeRO-0/2/3, exact resume), ZeRO-3 sharded loading, gradient checkpointing, the attention
implementation and bf16 training of every trained model. Tiny random models of the real architectures' code paths
(GPT-2's Conv1D layers, Llama's Linear ones) and subprocess runs on the built-in task."""

import copy
import json
import math
import os
import sys

import pytest
import torch
from conftest import (
    ROOT,
    TINY_ONLINE,
    assert_resume_reproduces,
    error_line,
    read_run,
    run_pairs,
    run_script,
)
from safetensors.torch import load_file

sys.path.insert(0, str(ROOT))
import common
import lora

LORA = "--lora-r 4 --lora-alpha 8 --learning-rate 1e-3".split()
RUNS = {
    "ppo": ("ppo.py", [*TINY_ONLINE, "--value-learning-rate", "1e-3"]),
    "apa": ("apa.py", [*TINY_ONLINE, "--value-learning-rate", "1e-3"]),
    "awr": (
        "awr.py",
        (
            "--offline-dataset HEAD --offline-epochs 1 --mini-batch-size 32 --max-new-tokens 16 --eval-prompts 16"
        ).split(),
    ),
    "alol": (
        "alol.py",
        (
            "--offline-dataset HEAD --total-steps 8 --mini-batch-size 4 --eval-every 4 --eval-prompts 8 "
            "--value-prompts 40 --value-epochs 2 --max-new-tokens 12 --no-cache"
        ).split(),
    ),
    "ilql": (
        "ilql.py",
        (
            "--offline-dataset HEAD --offline-epochs 1 --mini-batch-size 64 --eval-prompts 16 --max-new-tokens 16 "
            "--log-every 2 --eval-betas 0 2"
        ).split(),
    ),
}


def _args(name, head):
    """RUNS[name]'s arguments, HEAD the first rows of the built-in scored rows (conftest's builtin_offline_head)."""
    return [head if arg == "HEAD" else arg for arg in RUNS[name][1]]


def _tiny(arch: str, kind: str, seed=0):
    """A random 2-layer model of GPT-2's or Llama's code, as a policy (`causal`) or a value model (`score`)."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        GPT2Config,
        LlamaConfig,
    )

    torch.manual_seed(seed)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2, pad_token_id=0)
    else:
        config = LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=32,
            pad_token_id=0,
        )
    config.num_labels = 1
    cls = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    return cls.from_config(config).eval()


def _ragged(seed=1):
    """Left-padded prompts and right-padded responses of different lengths."""
    g = torch.Generator().manual_seed(seed)
    query_ids, response_ids = torch.randint(3, 64, (3, 5), generator=g), torch.randint(3, 64, (3, 4), generator=g)
    query_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    response_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    return query_ids, query_mask, response_ids, response_mask


def _moved_adapter(arch, kind, r=4):
    """A model with a LoRA adapter whose trained parameters (B too, and a value model's head) are moved off their
    initial values, as training would."""
    model = common.add_lora(_tiny(arch, kind), kind, r=r, alpha=8.0, dropout=0.0, target_modules=["all-linear"])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("kind", ["causal", "score"])
def test_merged_state_dict_equals_peft_merge_and_loads_as_a_plain_checkpoint(arch, kind, tmp_path):
    """W + (α/r)·B A per adapted layer (GPT-2's Conv1D stores W transposed), the trained value head in place of the
    original, peft's prefixes gone: what peft's own merge_and_unload gives, and a folder from_pretrained loads."""
    model = _moved_adapter(arch, kind)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n or "modules_to_save" in n for n in trainable), trainable
    merged = common.merged_state_dict(model.state_dict(), model)
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-5, atol=1e-6)
    common.hf_model(model).save_pretrained(tmp_path, state_dict=merged)
    reloaded = type(common.hf_model(model)).from_pretrained(tmp_path).eval()
    rows = _ragged()
    with torch.no_grad():
        if kind == "causal":
            torch.testing.assert_close(
                common.forward_logprobs(reloaded, *rows), common.forward_logprobs(model, *rows), rtol=1e-4, atol=1e-5
            )
        else:
            torch.testing.assert_close(
                common.forward_values(reloaded, *rows), common.forward_values(model, *rows), rtol=1e-4, atol=1e-5
            )


def test_adapter_off_is_the_base_model_and_the_head_sees_response_positions_only():
    """π_ref under LoRA: the policy's own forward with its adapter off equals the base model's; with it on, it does
    not. Through the PeftModel the LM head still runs on the R + 1 positions it needs (logits_to_keep)."""
    base = _tiny("llama", "causal")
    reference = copy.deepcopy(base)
    policy = _moved_adapter("llama", "causal")
    policy.get_base_model().load_state_dict(base.state_dict(), strict=False)  # same base weights as `reference`
    rows = _ragged()
    seen = []
    common.hf_model(policy).lm_head.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].shape[1]))
    with torch.no_grad():
        adapted = common.forward_logprobs(policy, *rows)
        with common.adapter_off(policy):
            off = common.forward_logprobs(policy, *rows)
        expected = common.forward_logprobs(reference, *rows)
    torch.testing.assert_close(off, expected)
    assert (adapted - expected).abs().max() > 1e-3
    assert seen == [rows[2].shape[1] + 1] * 2
    with common.adapter_off(reference):  # no adapter: nothing changes
        torch.testing.assert_close(common.forward_logprobs(reference, *rows).detach(), expected)


def test_gradient_checkpointing_recomputes_in_train_mode_with_the_same_gradients():
    """Each block runs twice per forward + backward in train mode (the recompute), once in eval mode (decoding keeps
    its KV cache); the gradients are those of the plain backward."""
    grads, calls = {}, {}
    rows = _ragged()
    for checkpointing in (False, True):
        model = common.gradient_checkpointing(_tiny("llama", "causal"), checkpointing).train()
        count = []
        mlp = model.model.layers[0].mlp  # inside the block (torch's recompute runs no module hooks: count calls)
        mlp.forward = lambda *inputs, forward=mlp.forward, count=count: count.append(1) or forward(*inputs)
        common.forward_logprobs(model, *rows).sum().backward()
        grads[checkpointing] = [p.grad.clone() for p in model.parameters()]
        calls[checkpointing] = len(count)
        model.eval()
        count.clear()
        with torch.no_grad():
            out = model.generate(
                input_ids=rows[0],
                attention_mask=rows[1],
                max_new_tokens=3,
                do_sample=False,
                pad_token_id=0,
                use_cache=True,
            )
        assert len(count) == 3 and out.shape[1] == rows[0].shape[1] + 3  # one cached step per new token
    assert calls == {False: 1, True: 2}
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b)


def test_attention_implementation_and_dropout_off(tmp_path):
    _tiny("llama", "causal").save_pretrained(tmp_path / "llama")
    model = common.load_model(str(tmp_path / "llama"), "causal", "--model-name-or-path", attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(
        GPT2Config(
            vocab_size=64,
            n_positions=32,
            n_embd=16,
            n_layer=1,
            n_head=2,
            resid_pdrop=0.5,
            attn_pdrop=0.5,
            embd_pdrop=0.5,
        )
    ).save_pretrained(tmp_path / "gpt2")
    model = common.load_model(str(tmp_path / "gpt2"), "causal", "--model-name-or-path").train()
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0 for m in dropouts)
    rows = _ragged()
    torch.testing.assert_close(common.forward_logprobs(model, *rows), common.forward_logprobs(model.eval(), *rows))


def _adapted_weight(state, prefix):
    """One weight that `all-linear` adapts in both the GPT-2 (attn.c_attn) built-in and its merged checkpoint."""
    return next(v for k, v in state.items() if k.startswith(prefix) and k.endswith("attn.c_attn.weight"))


@pytest.fixture(scope="module")
def lora_runs(builtin_path, builtin_offline_head, tmp_path_factory):
    """Every script once with a LoRA adapter (ZeRO-0, one process), two at a time, plus PPO under --bf16."""
    tmp = tmp_path_factory.mktemp("lora")
    jobs = {
        name: (script, [*_args(name, builtin_offline_head), *LORA, "--output-dir", str(tmp / name)], {})
        for name, (script, _) in RUNS.items()
    }
    jobs["ppo"][1].append("--gradient-checkpointing")
    jobs["apa"][1].extend(["--attn-implementation", "eager"])
    jobs["ppo_bf16"] = ("ppo.py", [*RUNS["ppo"][1], "--bf16", "--output-dir", str(tmp / "ppo_bf16")], {})
    jobs["ilql_bf16"] = (
        "ilql.py",
        [*_args("ilql", builtin_offline_head), "--bf16", "--output-dir", str(tmp / "ilql_bf16")],
        {},
    )
    procs = run_pairs(jobs)
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        (tmp / f"{name}.stdout").write_text(proc.stdout)
    return tmp


@pytest.mark.parametrize("name", list(RUNS))
def test_lora_end_to_end_in_every_script(lora_runs, builtin_path, name):
    """Only the adapter trains: the embeddings are the SFT model's, an adapted weight moved by a matrix of rank ≤ r.
    The checkpoint is the merged model (from_pretrained) and the adapter folder, which on the SFT model gives the same
    log-probs; the value models of PPO / APA / AWR are adapters too, with a head trained in full."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    run, records = read_run(lora_runs / name)
    assert all(math.isfinite(v) for r in records for v in r.values())
    # --learning-rate 1e-3 is ILQL's full fine-tune default (only): its run alone gets the note, once
    notes = (lora_runs / f"{name}.stdout").read_text().count("adapters usually need about")
    assert notes == (1 if name == "ilql" else 0)
    sft_dir = os.path.join(builtin_path, "sft")
    sft = load_file(os.path.join(sft_dir, "model.safetensors"))
    merged = load_file(run / "policy" / "model.safetensors")
    assert torch.equal(merged["transformer.wte.weight"], sft["transformer.wte.weight"])  # frozen base
    delta = _adapted_weight(merged, "transformer.h.1") - _adapted_weight(sft, "transformer.h.1")
    # rank ≤ r, counting singular values above 1e-3 of the largest: the rest is rounding in W + ΔW − W
    assert delta.abs().max() > 0 and torch.linalg.matrix_rank(delta.float(), rtol=1e-3) <= 4
    adapter_config = json.loads((run / "policy" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8
    policy = AutoModelForCausalLM.from_pretrained(run / "policy").eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft_dir), run / "policy" / "adapter")
    rows = [t.clamp(max=200) for t in _ragged()]
    with torch.no_grad():
        torch.testing.assert_close(
            common.forward_logprobs(policy, *rows), common.forward_logprobs(adapted.eval(), *rows), rtol=1e-4, atol=1e-4
        )
    if name in ("ppo", "apa", "awr"):
        value = AutoModelForSequenceClassification.from_pretrained(run / "value")
        reward = load_file(os.path.join(builtin_path, "reward", "model.safetensors"))
        assert not torch.equal(value.score.weight, reward["score.weight"])  # the head trains in full
        assert (run / "value" / "adapter" / "adapter_config.json").exists()
    if name == "ilql":
        assert {k.split(".")[0] for k in load_file(run / "policy" / "ilql_heads.safetensors")} == {
            "v_head",
            "q_heads",
            "target_q_heads",
        }
    if name in ("ppo", "apa"):  # π_ref is the SFT model: before training the policy is it, after it has moved
        assert records[0]["eval/kl_to_ref"] == 0 and records[-1]["eval/kl_to_ref"] != 0


@pytest.mark.parametrize("name", ["ppo_bf16", "ilql_bf16"])
def test_bf16_trains_every_model_in_bf16(lora_runs, name):
    """Under --bf16 the policy, the value model and ILQL's LM and heads are bf16 weights (DeepSpeed keeps float32
    master copies); the logged statistics stay finite."""
    run, records = read_run(lora_runs / name)
    assert all(math.isfinite(v) for r in records for v in r.values())
    folders = ["policy", "value"] if name == "ppo_bf16" else ["policy"]
    for folder in folders:
        assert {v.dtype for v in load_file(run / folder / "model.safetensors").values()} == {torch.bfloat16}, folder
    if name == "ilql_bf16":
        heads = load_file(run / "policy" / "ilql_heads.safetensors")
        assert heads["q_heads.0.0.weight"].dtype == torch.bfloat16
        assert heads["target_q_heads.0.0.weight"].dtype == torch.float32  # Polyak steps of α ~ 1e-4 need float32


@pytest.mark.parametrize("name", ["alol", "awr"])
def test_lora_resumes_exactly_in_one_process(builtin_path, builtin_offline_head, tmp_path, name):
    """With LoRA dropout and gradient checkpointing (train mode in the update, eval mode elsewhere, from the first
    step of a resumed run too); offline AWR over two epochs."""
    script = RUNS[name][0]
    args = [*_args(name, builtin_offline_head), *LORA, "--lora-dropout", "0.1", "--gradient-checkpointing"]
    if name == "awr":
        args += ["--offline-epochs", "2"]
    run_script(script, *args, "--output-dir", str(tmp_path / "a"))
    _, records = read_run(tmp_path / "a")
    assert_resume_reproduces(script, args, records, tmp_path)


@pytest.mark.parametrize("zero_stage", ["2", "3"])
def test_lora_two_ranks_resumes_exactly(builtin_path, tmp_path, zero_stage):
    """Two ranks, ZeRO-2 and ZeRO-3 (the policy, π_ref, value and reward models loaded shard by shard), LoRA on the
    policy and value model: stopped and resumed, the run logs every number of an uninterrupted one."""
    args = [*RUNS["ppo"][1], "--total-episodes", "64", *LORA, "--zero-stage", zero_stage]
    run_script("ppo.py", *args, "--output-dir", str(tmp_path / "a"), nproc=2)
    run, records = read_run(tmp_path / "a")
    assert records[-1]["eval/kl_to_ref"] != 0
    assert_resume_reproduces("ppo.py", args, records, tmp_path, nproc=2)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "policy")  # gathered from the ZeRO-3 shards, merged
    assert (run / "policy" / "adapter" / "adapter_model.safetensors").exists()


SHARDED_LOADING = """
import json, sys, torch
sys.path.insert(0, {root!r})
import common
rank, world_size, _ = common.init_distributed(3)
config = common.zero3_config("policy", 3, 2)
model = common.load_model({folder!r}, "causal", "--model-name-or-path", sharded=config)
local = sum(p.ds_tensor.numel() for p in model.parameters())
total = sum(p.ds_numel for p in model.parameters())
empty = all(p.numel() == 0 for p in model.parameters())
saved = common.load_model({folder!r}, "causal", "--model-name-or-path").state_dict()
with common.deepspeed.zero.GatheredParameters(list(model.parameters())):
    same = all(torch.equal(p, saved[name]) for name, p in model.named_parameters())
with open({out!r} + f"/rank{{rank}}.json", "w") as f:  # one file per rank: two ranks' prints can interleave
    json.dump(dict(rank=rank, local=local, total=total, empty=empty, same=same), f)
common.exit_cleanly()
"""


def test_zero3_loads_each_rank_its_own_shards(tmp_path):
    """Under ZeRO-3 a checkpoint (a Llama, as saved by save_pretrained) is loaded into a model built partitioned:
    every parameter is empty on each rank but for its shard, about half of the weights; gathered, they are the
    checkpoint's."""
    _tiny("llama", "causal").save_pretrained(tmp_path / "llama")
    script = tmp_path / "load.py"
    script.write_text(SHARDED_LOADING.format(root=str(ROOT), folder=str(tmp_path / "llama"), out=str(tmp_path)))
    run_script(str(script), nproc=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["empty"] and r["same"], r
        assert abs(r["local"] - r["total"] / 2) <= 0.01 * r["total"], r


def test_lora_learning_rate_note():
    """A --lora-r run at the script's full fine-tune default learning rate gets a note with the factor to try; another
    learning rate, or no adapter, gets none."""
    note = lora.lora_learning_rate_note(16, 3e-5, 3e-5)
    assert f"about {lora.LORA_LR_FACTOR}×" in note and f"--learning-rate {lora.LORA_LR_FACTOR * 3e-5:g}" in note
    assert lora.lora_learning_rate_note(16, 3e-4, 3e-5) is None
    assert lora.lora_learning_rate_note(0, 3e-5, 3e-5) is None
    assert lora.lora_learning_rate_note(16, 3e-5, None) is None


def test_lora_settings_that_cannot_work_fail_in_one_line(builtin_path, tmp_path):
    jobs = {
        "four_bit_alone": ("ppo.py", ["--load-in-4bit"], {}),
        "four_bit_cpu": ("alol.py", ["--load-in-4bit", "--lora-r", "8"], {}),
        "unfrozen": ("apa.py", ["--lora-r", "8", "--unfrozen-layers", "2"], {}),
        "four_bit_zero": ("ilql.py", ["--load-in-4bit", "--lora-r", "8", "--zero-stage", "2"], {}),
        "target": ("awr.py", "--lora-r 8 --lora-target-modules q_proj --offline-dataset builtin".split(), {}),
    }
    for name, (_, args, _) in jobs.items():
        args += ["--output-dir", str(tmp_path / name)]
    procs = run_pairs(jobs)
    lines = {name: error_line(proc) for name, proc in procs.items()}
    assert "pass --lora-r" in lines["four_bit_alone"]
    assert "needs a CUDA GPU" in lines["four_bit_cpu"] and "drop --load-in-4bit" in lines["four_bit_cpu"]
    assert "--unfrozen-layers 2" in lines["unfrozen"] and "pass one" in lines["unfrozen"]
    assert "use --zero-stage 0" in lines["four_bit_zero"]
    assert "--lora-target-modules q_proj" in lines["target"] and "all-linear" in lines["target"]
