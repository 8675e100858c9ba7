"""Peak host memory per rank of a short ppo.py run under ZeRO-2 and ZeRO-3, on CPU ranks.

    python tests/loading_memory.py                  # 2 ranks, a random 77M-parameter Llama with GPT-2's BPE
    python tests/loading_memory.py --ranks 2 4 --hidden 768 --layers 12

The policy, π_ref, the value model and the reward model are all this Llama (the reward and value models as
1-output classifiers), so four copies of its weights are loaded. Under ZeRO-2 every rank loads each model whole
before DeepSpeed takes it; under ZeRO-3 each is built partitioned and loaded shard by shard (common.sharded_loading),
so a rank holds about 1/ranks of every model. Each rank runs under /usr/bin/time, whose maximum resident set size
is that process's peak; the table prints it for every rank, with the weights' own size for scale. One iteration:
loading, one rollout (8 prompts, 8 new tokens per rank), one update; no timing is measured.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT2_DIR = os.path.join(ROOT, "..", "shared", "data", "tokenizers", "gpt2")


def build(folder: str, hidden: int, layers: int):
    """A random Llama with GPT-2's 50k BPE as a policy (`folder`/policy) and as a 1-output classifier (`folder`/rm)."""
    import torch
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
    )

    tokenizer = AutoTokenizer.from_pretrained(GPT2_DIR)
    tokenizer.pad_token = tokenizer.eos_token
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        num_labels=1,
    )
    torch.manual_seed(0)
    policy = LlamaForCausalLM(config)
    policy.save_pretrained(os.path.join(folder, "policy"))
    tokenizer.save_pretrained(os.path.join(folder, "policy"))
    LlamaForSequenceClassification(config).save_pretrained(os.path.join(folder, "rm"))
    tokenizer.save_pretrained(os.path.join(folder, "rm"))
    return sum(p.numel() for p in policy.parameters())


def run(folder: str, zero_stage: int, ranks: int) -> list:
    """Peak RSS in MiB of each rank of one short ppo.py run."""
    script_args = [
        "--model-name-or-path", os.path.join(folder, "policy"),
        "--reward-model", os.path.join(folder, "rm"),
        "--zero-stage", str(zero_stage),
        "--total-episodes", str(8 * ranks),
        "--rollout-batch-size", "8",
        "--mini-batch-size", "4",
        "--max-new-tokens", "8",
        "--eval-prompts", str(2 * ranks),
        "--eval-every", "100",
        "--output-dir", os.path.join(folder, f"runs_zero{zero_stage}"),
    ]  # fmt: skip
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--no-python",
        "/usr/bin/time", "-f", "peak-rss-kib %M", sys.executable, os.path.join(ROOT, "ppo.py"), *script_args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: ZeRO-{zero_stage} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return [int(kib) / 1024 for kib in re.findall(r"peak-rss-kib (\d+)", proc.stderr)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2], help="CPU ranks (torchrun processes), each")
    parser.add_argument("--hidden", type=int, default=512, help="the Llama's hidden size (heads of 64)")
    parser.add_argument("--layers", type=int, default=8, help="the Llama's number of blocks")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        n_params = build(folder, opts.hidden, opts.layers)
        peaks = {(stage, ranks): run(folder, stage, ranks) for ranks in opts.ranks for stage in (2, 3)}
    weights_mib = n_params * 4 / 2**20
    print(
        f"a random Llama of {n_params / 1e6:.1f} M parameters ({weights_mib:.0f} MiB in float32; four models "
        f"of it: policy, π_ref, value, reward), CPU ranks, one ppo.py iteration"
    )
    print("| ZeRO stage | ranks | peak RSS of each rank (MiB) |")
    print("|---|---|---|")
    for (stage, ranks), values in peaks.items():
        print(f"| {stage} | {ranks} | {' / '.join(f'{v:.0f}' for v in values)} |")


if __name__ == "__main__":
    main()
