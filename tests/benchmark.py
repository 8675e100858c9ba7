"""Throughput benchmark of the online scripts (ppo, apa, awr) against bare HF / torch loops, measured in one process.

    ./launch.sh bench                      # the built-in models, 64 prompts, <= 32 new tokens, median of 3 repeats
    python tests/benchmark.py --scripts ppo --batch-size 16 --json bench.json

For each script, on one fixed prompt batch and the script's own settings (its `Args` defaults, ZeRO-0, float32):

  rollout ratio = (real response tokens / s of the script's `generate(...)` + `common.truncate_after_eos`)
                / (real response tokens / s of a bare `model.generate(...)` with the same GenerationConfig settings);
                both sample from the same seed, so both produce the same tokens (checked) and count them the same way.
  update ratio  = (response tokens / s of one epoch of the script's update: its forward_logprobs / forward_values,
                   its loss, backward and step on the DeepSpeed engines of `common.prepare_trainable`)
                / (the same tokens / s of a bare loop over the same mini-batches and the same two models: plain
                   forward, `logits.mean() + value-head mean`, one backward, `torch.optim.AdamW` step each).
  scoring       = reward model at the last token, log-probs of π_old and π_ref, values, rewards, GAE, whitening.
  peak memory   = GPU: torch.cuda.max_memory_allocated; CPU: the process's peak RSS (VmHWM, reset before each
                  script), over one full script iteration (rollout, scoring, one update epoch) with its models loaded.
  shares        = generation / scoring / update of one script iteration, the update counted `ppo_epochs` times.

Ratios are medians of the per-repeat ratios (the two sides of a ratio run back to back, in alternating order); a
ratio under its target (rollout 0.9, update 0.8) is marked, but the exit status stays 0. No timing is asserted.
"""
import argparse
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONLINE = ("ppo", "apa", "awr")
TARGETS = {"rollout": 0.9, "update": 0.8}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="./launch.sh bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    p.add_argument("--model", default="builtin", help="policy (and π_ref): hub name, folder or `builtin`")
    p.add_argument("--reward-model", default="builtin", help="reward model (and value-model init): hub name, "
                                                             "folder, `builtin` or module:function")
    p.add_argument("--dataset", default="builtin", help="where the prompts come from (its `train` split)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per rollout (the scripts' rollout batch)")
    p.add_argument("--mini-batch-size", type=int, default=None,
                   help="responses per update step (default: the script's own, capped at --batch-size)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest response sampled")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up; medians are reported")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto = cuda if available else cpu (cpu hides the GPUs from this process)")
    p.add_argument("--scripts", nargs="+", choices=ONLINE, default=list(ONLINE), help="which online scripts")
    p.add_argument("--seed", type=int, default=1, help="seed of the prompt draw and of the sampling")
    p.add_argument("--json", metavar="PATH", help="also write every number (and the per-repeat times) here")
    p.add_argument("--trust-remote-code", action="store_true")
    args = p.parse_args(argv)
    for name in ("batch_size", "max_new_tokens", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.mini_batch_size is not None and (args.mini_batch_size < 1 or args.batch_size % args.mini_batch_size):
        p.error(f"--mini-batch-size must divide --batch-size {args.batch_size}")
    return args


def machine_line(torch, device):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = [f"torch {torch.__version__} ({torch.get_num_threads()} CPU threads)"]
    for module in ("transformers", "deepspeed"):
        try:
            versions.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            versions.append(f"no {module}")
    gpu = f"{torch.cuda.get_device_name(device)}" if device.type == "cuda" else "none used"
    return (f"machine: {cpu}, {os.cpu_count()} cores ({usable} usable), {platform.system()} {platform.release()}; "
            f"{', '.join(versions)}; device {device} (GPU: {gpu})")


# ---- peak memory: GPU max allocated, else the process's peak RSS (VmHWM, reset per script where Linux allows) ----
def reset_peak(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return "GPU max_memory_allocated"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: resets VmHWM (peak RSS) to the current RSS
        return "peak RSS (VmHWM, reset per script)"
    except OSError:
        return "peak RSS of the process so far (ru_maxrss; cannot reset)"


def read_peak(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def load_reward(common, opts, tokenizer, micro_batch_size):
    """score(query_ids, query_mask, response_ids, response_mask) -> [batch] scores, loaded as the scripts load it:
    `common.load_reward` (a frozen model on the policy's device, or a `module:function`), one reward of weight 1."""
    reward = common.load_reward(opts.reward_model, tokenizer, placement="policy", zero_stage=0,
                                micro_batch_size=micro_batch_size, bf16=False,
                                trust_remote_code=opts.trust_remote_code)
    if not hasattr(reward, "same_vocabulary"):  # a Python function: the value model starts from the policy
        reward.same_vocabulary = False
    return reward


def main(argv=None):
    opts = parse_args(argv)
    if opts.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch / DeepSpeed look: the engines land on the CPU too
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.path.insert(0, ROOT)
    import importlib

    import torch
    from transformers import GenerationConfig

    import common
    if opts.device == "cuda" and not torch.cuda.is_available():
        common.fail("--device cuda, but torch sees no GPU")
    _, world_size, device = common.init_distributed(0)  # a world of one: DeepSpeed's ZeRO-0 engines need a group
    if world_size != 1:
        common.fail("the benchmark runs as one process; start it with python (or ./launch.sh bench), not torchrun")
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - t0

    header = machine_line(torch, device)
    tokenizer = common.load_tokenizer(opts.model, "--model", trust_remote_code=opts.trust_remote_code)
    prompt_texts = common.load_prompts(opts.dataset, "train")
    draw = torch.randint(len(prompt_texts), (opts.batch_size,), generator=torch.Generator().manual_seed(opts.seed))
    prompt_texts = [prompt_texts[i] for i in draw]

    def bench_one(name):
        """Time one script against the bare baselines; its models live and die in this call."""
        mod = importlib.import_module(name)
        sargs = mod.Args()  # the script's own defaults: sampling, mini-batch size, loss coefficients, learning rates
        mb = min(opts.mini_batch_size or sargs.mini_batch_size, opts.batch_size)
        if opts.batch_size % mb:
            common.fail(f"--batch-size {opts.batch_size} is not a multiple of {name}'s mini-batch size {mb}; pass "
                        f"--mini-batch-size")
        epochs = sargs.ppo_epochs
        print(f"bench: {name} (mini-batch {mb}, {opts.repeats} repeat(s) after a warm-up)", file=sys.stderr, flush=True)

        # ---- models, placed as the script places them (ZeRO-0, float32, everything on this rank's device) ----------
        random.seed(opts.seed)
        torch.manual_seed(opts.seed)
        load = dict(dtype="float32", trust_remote_code=opts.trust_remote_code)
        policy = common.load_model(opts.model, "causal", "--model", **load)
        ref_policy = common.load_model(opts.model, "causal", "--model", **load)
        reward = load_reward(common, opts, tokenizer, mb)
        value_source = common.resolve(opts.reward_model, "reward") if reward.same_vocabulary else \
            common.resolve(opts.model, "sft")  # as the scripts do: the value model needs the policy's vocabulary
        value_model = common.load_model(value_source, "score", "--reward-model", **load)
        context = policy.config.max_position_embeddings
        policy.generation_config.pad_token_id = tokenizer.pad_token_id
        policy = common.prepare_trainable(policy, "policy", 0, mb, sargs.learning_rate, bf16=False, offload=False,
                                          max_grad_norm=sargs.max_grad_norm)
        value_model = common.prepare_trainable(value_model, "policy", 0, mb, sargs.value_learning_rate, bf16=False,
                                               offload=False, max_grad_norm=sargs.max_grad_norm)
        ref_policy = common.prepare_frozen(ref_policy, "policy", 0, mb)
        raw_policy, raw_value = getattr(policy, "module", policy), getattr(value_model, "module", value_model)
        generation_config = GenerationConfig(
            do_sample=True, temperature=sargs.temperature, top_k=sargs.top_k, top_p=sargs.top_p,
            max_new_tokens=opts.max_new_tokens, use_cache=True, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id)
        rows, _ = common.encode_prompts(tokenizer, prompt_texts, max_prompt_length=sargs.max_prompt_length,
                                        max_new_tokens=opts.max_new_tokens, context=context)
        query_ids, query_mask = common.pad_left(rows, tokenizer.pad_token_id, device)

        # ---- the script's path --------------------------------------------------------------------------------------
        def script_generate():  # what rollout() does before scoring
            response_ids = mod.generate(policy, query_ids, query_mask, generation_config, False)
            return common.truncate_after_eos(response_ids, tokenizer.eos_token_id, tokenizer.pad_token_id)

        def bare_generate():
            return raw_policy.generate(
                input_ids=query_ids, attention_mask=query_mask, do_sample=True, temperature=sargs.temperature,
                top_k=sargs.top_k, top_p=sargs.top_p, max_new_tokens=opts.max_new_tokens, use_cache=True,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)

        def script_score(response_ids, response_mask):
            """The rest of rollout() and the iteration up to the update: reward, π_old, π_ref, values, GAE."""
            scores = reward(query_ids, query_mask, response_ids, response_mask).to(device)
            with torch.no_grad():
                fwd = (query_ids, query_mask, response_ids, response_mask)
                old_logprobs = common.forward_logprobs(policy, *fwd, temperature=sargs.temperature)
                ref_logprobs = common.forward_logprobs(ref_policy, *fwd, temperature=sargs.temperature).to(device)
                mask = response_mask.to(old_logprobs.dtype)
                batch = (query_ids, query_mask, response_ids, mask)
                if name == "ppo":
                    old_values = common.forward_values(value_model, *batch).to(device)
                    kl = (old_logprobs - ref_logprobs) * mask
                    rewards = -sargs.init_kl_coef * kl
                else:  # apa / awr: all_values() in chunks of 256, the score alone on the last token
                    old_values = torch.cat([common.forward_values(value_model, *[t[i:i + 256] for t in batch])
                                            .to(device) for i in range(0, len(mask), 256)])
                    rewards = torch.zeros_like(mask)
                rewards[torch.arange(len(rewards)), mask.sum(1).long() - 1] += scores
                advantages, returns = mod.compute_gae(rewards, old_values, mask, sargs.gamma, sargs.gae_lambda)
                if sargs.whiten_advantages:
                    advantages = common.whiten_masked(advantages, mask, across_ranks=True)
            return SimpleNamespace(batch=batch, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                                   old_values=old_values, advantages=advantages, returns=returns)

        def script_update(r, minibatches):
            """One epoch of the script's update loop (ppo.py's inner loop; apa.py / awr.py's update())."""
            step_stats = []
            for idx in minibatches:
                fwd = [t[idx] for t in r.batch]
                mask = fwd[3]
                if name == "ppo":
                    logprobs, entropy = common.forward_logprobs(policy, *fwd, temperature=sargs.temperature,
                                                                with_entropy=True)
                    values = common.forward_values(value_model, *fwd).to(device)
                    _, stats = mod.ppo_loss(
                        logprobs=logprobs, old_logprobs=r.old_logprobs[idx], values=values,
                        old_values=r.old_values[idx], advantages=r.advantages[idx], returns=r.returns[idx],
                        mask=mask, cliprange=sargs.cliprange, cliprange_value=sargs.cliprange_value,
                        vf_coef=sargs.vf_coef)
                    entropy_mean = common.masked_mean(entropy, mask)
                    policy.backward(stats["pg_loss"] - sargs.entropy_coef * entropy_mean)
                    value_model.backward(sargs.vf_coef * stats["vf_loss"])
                    policy.step()
                    value_model.step()
                    stats["policy/entropy"] = entropy_mean.detach()
                    step_stats.append({k: v.item() for k, v in stats.items()})
                else:
                    logprobs = common.forward_logprobs(policy, *fwd, temperature=sargs.temperature)
                    values = common.forward_values(value_model, *fwd).to(device)
                    if name == "apa":
                        pg_loss = mod.apa_loss(logprobs=logprobs, ref_logprobs=r.ref_logprobs[idx],
                                               advantages=r.advantages[idx], mask=mask, lam=sargs.lam)
                    else:
                        pg_loss = mod.awr_loss(logprobs=logprobs, advantages=r.advantages[idx], mask=mask,
                                               lam=sargs.lam, max_weight=sargs.max_weight)
                    vf_loss = mod.value_loss(values=values, returns=r.returns[idx], mask=mask)
                    policy.backward(pg_loss)
                    value_model.backward(sargs.vf_coef * vf_loss)
                    policy.step()
                    value_model.step()
                    log_ratio = (logprobs - r.ref_logprobs[idx]).detach()
                    stats = [pg_loss.item(), vf_loss.item(), common.masked_mean(log_ratio, mask).item()]
                    if name == "awr":
                        clamped = (r.advantages[idx] / sargs.lam > math.log(sargs.max_weight)).to(log_ratio.dtype)
                        stats.append(common.masked_mean(clamped, mask).item())
                    step_stats.append(stats)
            return step_stats

        # ---- the bare loop: same two models, same mini-batch inputs, simplest loss, plain AdamW ----------------------
        def bare_inputs(r, minibatches):  # built outside the timed region
            return [common.concat_inputs(*[t[idx] for t in r.batch], device) for idx in minibatches]

        def bare_update(inputs, optimizers):
            value_body = getattr(raw_value, raw_value.base_model_prefix)
            for ids, mask, pos in inputs:
                loss = raw_policy(input_ids=ids, attention_mask=mask, position_ids=pos).logits.mean()
                hidden = value_body(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
                loss = loss + raw_value.score(hidden).mean()
                loss.backward()
                for optimizer in optimizers:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

        def minibatches_for(seed):
            return torch.randperm(opts.batch_size, generator=torch.Generator().manual_seed(seed)).split(mb)

        # ---- warm-up = the memory pass: one script iteration, nothing of the bare side allocated yet ----------------
        gc.collect()
        memory_kind = reset_peak(torch, device)
        torch.manual_seed(opts.seed)
        response_ids, response_mask, _ = script_generate()
        rollout = script_score(response_ids, response_mask)
        script_update(rollout, minibatches_for(opts.seed))
        peak_bytes = read_peak(torch, device)
        optimizers = [torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
                      for m, lr in ((raw_policy, sargs.learning_rate), (raw_value, sargs.value_learning_rate))]
        torch.manual_seed(opts.seed)
        bare_generate()
        bare_update(bare_inputs(rollout, minibatches_for(opts.seed)), optimizers)

        # ---- timed repeats: each pair back to back, the order alternating --------------------------------------------
        reps = []
        for rep in range(opts.repeats):
            seed = opts.seed + 1 + rep
            flip = rep % 2 == 1
            gen = {}
            for side in (("bare", "script") if flip else ("script", "bare")):
                torch.manual_seed(seed)
                gen[side] = timed(script_generate if side == "script" else bare_generate)
            (response_ids, response_mask, _), t_gen = gen["script"]
            bare_out, t_bare_gen = gen["bare"]
            bare_ids, bare_mask, _ = common.truncate_after_eos(bare_out[:, query_ids.shape[1]:],
                                                               tokenizer.eos_token_id, tokenizer.pad_token_id)
            same = bool(torch.equal(bare_ids, response_ids) and torch.equal(bare_mask, response_mask))
            gen_tokens = int(response_mask.sum())  # real response tokens, the EOS included, padding not
            rollout, t_score = timed(lambda: script_score(response_ids, response_mask))
            update_tokens = int(rollout.batch[3].sum())  # one epoch visits every response once
            minibatches = minibatches_for(seed)
            inputs = bare_inputs(rollout, minibatches)
            runs = {"script": lambda: script_update(rollout, minibatches),
                    "bare": lambda: bare_update(inputs, optimizers)}
            upd = {side: timed(runs[side])[1] for side in (("bare", "script") if flip else ("script", "bare"))}
            reps.append(dict(same_tokens=same, gen_tokens=gen_tokens, bare_gen_tokens=int(bare_mask.sum()),
                             t_gen=t_gen, t_bare_gen=t_bare_gen, t_score=t_score, update_tokens=update_tokens,
                             t_update=upd["script"], t_bare_update=upd["bare"]))

        med = lambda key: statistics.median(key(r) for r in reps)  # noqa: E731
        t_gen, t_score, t_update = med(lambda r: r["t_gen"]), med(lambda r: r["t_score"]), med(lambda r: r["t_update"])
        iteration = t_gen + t_score + epochs * t_update
        return dict(
            script=name, policy_parameters=sum(p.numel() for p in raw_policy.parameters()), mini_batch_size=mb,
            ppo_epochs=epochs,
            rollout_tokens_per_s=med(lambda r: r["gen_tokens"] / r["t_gen"]),
            bare_generate_tokens_per_s=med(lambda r: r["bare_gen_tokens"] / r["t_bare_gen"]),
            rollout_ratio=med(lambda r: (r["gen_tokens"] / r["t_gen"]) / (r["bare_gen_tokens"] / r["t_bare_gen"])),
            update_tokens_per_s=med(lambda r: r["update_tokens"] / r["t_update"]),
            bare_update_tokens_per_s=med(lambda r: r["update_tokens"] / r["t_bare_update"]),
            update_ratio=med(lambda r: r["t_bare_update"] / r["t_update"]),
            rollout_with_scoring_ratio=med(lambda r: (r["gen_tokens"] / (r["t_gen"] + r["t_score"]))
                                           / (r["bare_gen_tokens"] / r["t_bare_gen"])),
            same_tokens=all(r["same_tokens"] for r in reps), peak_memory_bytes=peak_bytes, memory_kind=memory_kind,
            share_generation=t_gen / iteration, share_scoring=t_score / iteration,
            share_update=epochs * t_update / iteration, repeats=reps)

    results = []
    for name in opts.scripts:
        results.append(bench_one(name))
        gc.collect()  # the script's models and engines go before the next script's peak is measured
        if cuda:
            torch.cuda.empty_cache()
    memory_kind, n_params = results[0]["memory_kind"], results[0]["policy_parameters"]

    # ---- report -------------------------------------------------------------------------------------------------
    def ratio(x, target):
        return f"{x:.2f}" + ("" if x >= target else " ⚠ below") if math.isfinite(x) else "n/a"

    lines = [header,
             f"setup: policy {opts.model} ({n_params / 1e6:.2f} M parameters), reward/value {opts.reward_model}; "
             f"{opts.batch_size} prompts, <= {opts.max_new_tokens} new tokens, float32, ZeRO-0, one process; "
             f"median of {opts.repeats} repeat(s) after 1 warm-up; memory = {memory_kind}",
             "",
             "| script | rollout tok/s | bare generate tok/s | rollout ratio (≥ 0.9) | update tok/s | "
             "bare loop tok/s | update ratio (≥ 0.8) | peak memory (MiB) | gen / score / update |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['script']} | {r['rollout_tokens_per_s']:.0f} | {r['bare_generate_tokens_per_s']:.0f} | "
            f"{ratio(r['rollout_ratio'], TARGETS['rollout'])} | {r['update_tokens_per_s']:.0f} | "
            f"{r['bare_update_tokens_per_s']:.0f} | {ratio(r['update_ratio'], TARGETS['update'])} | "
            f"{r['peak_memory_bytes'] / 2**20:.0f} | {100 * r['share_generation']:.0f} / "
            f"{100 * r['share_scoring']:.0f} / {100 * r['share_update']:.0f} % |")
    lines.append("")
    lines.append("tok/s = real response tokens per second. rollout = the script's generate() + truncate_after_eos; "
                 "update = one epoch of the script's mini-batch loop (loss, backward, step on its DeepSpeed engines) "
                 "vs a bare forward/backward/AdamW loop on the same models and mini-batches; shares are of one "
                 "iteration (generation, scoring, ppo_epochs × update). ⚠ = below target (reported, not failed).")
    for r in results:
        if not r["same_tokens"]:
            lines.append(f"warning: {r['script']}: the script's and the bare generate() sampled different tokens from "
                         f"the same seed; the rollout ratio compares different work")
    print("\n".join(lines), flush=True)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(dict(machine=header, settings=vars(opts), device=str(device), memory_kind=memory_kind,
                           policy_parameters=n_params, targets=TARGETS, results=results), f, indent=1)
        print(f"wrote {opts.json}")
    import torch.distributed as dist
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
