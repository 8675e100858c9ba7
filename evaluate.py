"""The judged evaluation of a saved run, an optional part beside common.py: the policy of a finished run against a
baseline (its starting policy π_init, or another run) under a judge, with its KL to π_init (`./launch.sh eval`).

    python evaluate.py RUN_DIR [--baseline sft|RUN_DIR] [--judge ENTRY] [--prompts N] [--beta B] ...

An ILQL run decodes as ilql.py does: eval_policy imports ilql.py for its logits processor (ILQLLogitsProcessor), so
evaluating one needs ilql.py beside this file."""

import contextlib
import copy
import json
import os
from types import SimpleNamespace
from typing import NamedTuple

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from common import (
    BUILTIN,
    Batch,
    builtin_gold_score,
    check_reward_entry,
    distinct_n,
    encode_prompts,
    fail,
    fitting_prompts,
    forward_logprobs,
    library_bars,
    load_model,
    load_prompts,
    load_reward,
    load_tokenizer,
    optional_part,
    pad_left,
    progress,
    resolve,
    truncate_after_eos,
)


# ---- Evaluation of a saved run: its policy against a baseline, under a judge -----------------------------------------
class Samples(NamedTuple):
    """Responses sampled for evaluation: the token ids (`batch`), the log-probs of the sampled tokens under the
    distribution they were drawn from, [n, response_len] (0 on padding), and the texts with special tokens kept."""

    batch: Batch
    logprobs: torch.Tensor
    texts: list


class EvalPolicy(NamedTuple):
    """A policy to sample from: the causal LM and, for an ILQL folder, the logits processor of ILQL's decoding."""

    lm: torch.nn.Module
    processor: object  # a LogitsProcessor (entered as a context manager), or None


def eval_policy(path: str, flag: str, device, beta: float) -> EvalPolicy:
    """The policy saved in `path`. A folder written by ilql.py (with ilql_heads.safetensors) is ILQL's policy: the
    LM and its heads together, decoding with log_softmax(logits) + β·(min Q̂ − V) as ilql.py does."""
    lm = load_model(name=path, kind="causal", flag=flag).to(device).eval()
    if not os.path.exists(os.path.join(resolve(path, "sft"), "ilql_heads.safetensors")):
        return EvalPolicy(lm, None)
    ilql = optional_part("ilql.py", f"{flag} {path}, a run of ilql.py,")  # the decoding lives with its algorithm

    model = ilql.ILQLModel(lm)
    target_q_heads = copy.deepcopy(model.q_heads)
    ilql.load_heads(model, target_q_heads, resolve(path, "sft"))
    model.to(device).eval()
    return EvalPolicy(lm, ilql.ILQLLogitsProcessor(model, target_q_heads.to(device), beta))


class SampledLogprobs(LogitsProcessor):
    """The last processor of a `generate` call: at each step it keeps the log-softmax of the scores the next token is
    drawn from, [batch, vocabulary], and at the next step (whose input ends with that token) keeps only the drawn
    token's log-prob. One step's distribution is alive at a time, not one per step as `output_scores` keeps them."""

    def __init__(self):
        self.previous = None
        self.logprobs = []

    def __call__(self, input_ids, scores):
        if self.previous is not None:
            self.logprobs.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = scores.float().log_softmax(-1)
        return scores

    def finish(self, response_ids) -> torch.Tensor:
        """[batch, steps]: the log-prob of each sampled token; `response_ids` the tokens generated."""
        if self.previous is not None:  # the last token is drawn after the last call
            self.logprobs.append(self.previous.gather(1, response_ids[:, len(self.logprobs), None]).squeeze(1))
        return (
            torch.stack(self.logprobs, 1)
            if self.logprobs
            else response_ids.new_zeros(response_ids.shape, dtype=torch.float)
        )


def sampling_processors(settings: GenerationConfig) -> tuple[GenerationConfig, list]:
    """`settings` without its temperature, top-k and top-p, and those warpers as processors in `generate`'s order,
    so that a processor placed after them (SampledLogprobs) reads the distribution the tokens are drawn from."""
    warpers = []
    if settings.do_sample and settings.temperature is not None and settings.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(settings.temperature))
    if settings.do_sample and settings.top_k:
        warpers.append(TopKLogitsWarper(top_k=settings.top_k))
    if settings.do_sample and settings.top_p is not None and settings.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=settings.top_p))
    plain = copy.deepcopy(settings)
    plain.temperature = 1.0
    plain.top_k = 0
    plain.top_p = 1.0
    plain.output_scores = False
    plain.return_dict_in_generate = False
    return plain, warpers


@torch.no_grad()
def sample_for_eval(
    policy: EvalPolicy,
    tokenizer,
    prompt_rows,
    *,
    settings,
    stop_strings,
    batch_size,
    device,
    desc="sampling",
    show_progress=True,
):
    """Responses to the (token-id) prompts, sampled with `settings` (a GenerationConfig), cut after EOS and at the
    stop strings, with the log-probs of the sampled tokens under the sampling distribution itself: read from the
    processed scores at each step of `generate` (ILQL's shift, temperature, top-k and top-p applied; SampledLogprobs),
    so KL estimates need no second pass through the policy. `desc`: the name of its progress bar."""
    plain, warpers = sampling_processors(settings)
    parts = []
    for start in progress(range(0, len(prompt_rows), batch_size), desc=desc, enabled=show_progress):
        query_ids, query_mask = pad_left(prompt_rows[start : start + batch_size], tokenizer.pad_token_id, device)
        recorder = SampledLogprobs()
        processors = [policy.processor] if policy.processor is not None else []
        with policy.processor or contextlib.nullcontext():
            sequences = policy.lm.generate(
                input_ids=query_ids,
                attention_mask=query_mask,
                generation_config=plain,
                logits_processor=[*processors, *warpers, recorder],
            )
        response_ids = sequences[:, query_ids.shape[1] :]
        logprobs = recorder.finish(response_ids)
        response_ids, response_mask, _ = truncate_after_eos(
            response_ids,
            eos_id=tokenizer.eos_token_id,
            pad_id=tokenizer.pad_token_id,
            tokenizer=tokenizer,
            stop_strings=stop_strings,
        )
        texts = [
            tokenizer.decode(row[: int(n)], skip_special_tokens=False)
            for row, n in zip(response_ids.tolist(), response_mask.sum(1).tolist())
        ]
        parts.append(
            Samples(Batch(query_ids, query_mask, response_ids, response_mask), logprobs * response_mask, texts)
        )
    return parts


def win_rate(scores, baseline_scores, resamples: int = 1000, seed: int = 0):
    """The fraction of prompts where the policy's response beats the baseline's under the judge (a tie counts ½),
    with a 95% bootstrap interval over prompts (percentiles of `resamples` resampled means): (rate, low, high)."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    baseline_scores = torch.as_tensor(baseline_scores, dtype=torch.float64)
    wins = (scores > baseline_scores).double() + 0.5 * (scores == baseline_scores).double()
    draws = torch.randint(len(wins), (resamples, len(wins)), generator=torch.Generator().manual_seed(seed))
    means = wins[draws].mean(1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return wins.mean().item(), low, high


@torch.no_grad()  # every pass here only scores: no autograd graph is kept (it would grow with every batch)
def evaluate_run(
    run_dir: str,
    *,
    baseline="sft",
    judge=None,
    prompts=None,
    temperature=1.0,
    beta=1.0,
    batch_size=16,
    seed=1,
    device="cpu",
    init_device=None,
    out=None,
    show_progress=True,
) -> dict:
    """The policy of a finished run (`run_dir`/policy) against a baseline (`sft`: the run's starting policy, π_init;
    or another run's folder) on the run's held-out prompts (the first `prompts` of its --eval-split; default its
    --eval-prompts). Both are sampled at `temperature` over the full vocabulary with one seed, and decoded greedily.
    On the samples: the win rate of the policy under `judge` (a --reward-model entry, or `gold`: the built-in task's
    gold score, the default there) with its 95% bootstrap interval, and the policy's KL to π_init,
    Σ_t log p(y_t) − log π_init(y_t) per sampled response (mean, nats, with its standard error). On both decodings:
    the run's proxy reward (its --reward-model entries, raw scores weighted by its --reward-weights), the gold score
    on the built-in task, distinct-2 and the response length. The pairs go to `out` (default
    `run_dir`/eval-vs-BASELINE.jsonl), the summary (returned) to the same name with .json. `show_progress`: tqdm
    bars while sampling, in a terminal (`progress`). `device`: where the policy, the baseline and the judge run;
    `init_device`: where π_init runs (default `device`; e.g. `cpu` or a second GPU when one holds two models but not
    three; the baseline π_init then samples there, from another device's random numbers than the policy's). Every
    score and log-prob is brought to the CPU before they are combined."""
    with open(os.path.join(run_dir, "args.json")) as f:
        run = SimpleNamespace(**json.load(f))
    policy_path = os.path.join(run_dir, "policy")
    if not os.path.isdir(policy_path):
        fail(f"{run_dir} has no policy/ folder: pass the folder of a run that finished (runs/NAME)")
    builtin = run.dataset == BUILTIN
    judge = judge or ("gold" if builtin else None)
    if judge is None:
        fail(f"{run_dir} was not trained on the built-in task: pass --judge (a reward model, module:function or URL)")
    for entry, flag in [(judge, "--judge"), *((entry, "the run's --reward-model") for entry in run.reward_model)]:
        if entry != "gold":
            check_reward_entry(entry, flag)  # before anything is sampled: a wrong entry stops it in seconds
    device = torch.device(device)
    init_device = device if init_device is None else torch.device(init_device)
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(policy_path, flag="RUN_DIR")
    policy = eval_policy(policy_path, flag="RUN_DIR", device=device, beta=beta)
    init = EvalPolicy(load_model(name=run.model_name_or_path, kind="causal", flag="--model-name-or-path"), None)
    init = init._replace(lm=init.lm.to(init_device).eval())
    if baseline == "sft":
        other = init
    else:
        other = eval_policy(os.path.join(baseline, "policy"), flag="--baseline", device=device, beta=beta)

    # The held-out prompts, as the run evaluated them
    encode = dict(
        max_prompt_length=run.max_prompt_length,
        max_new_tokens=run.max_new_tokens,
        context=policy.lm.config.max_position_embeddings,
        chat_template=getattr(run, "chat_template", False),
    )
    texts = load_prompts(run.dataset, run.eval_split, run.prompt_field)
    texts = [texts[i] for i in fitting_prompts(tokenizer, texts, what="evaluation prompts", **encode)]
    texts = texts[: prompts or run.eval_prompts]  # the prompts the run evaluated: the first that fit
    prompt_rows, _ = encode_prompts(tokenizer, texts, **encode)
    decoding = dict(
        max_new_tokens=run.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    sampling = dict(
        stop_strings=getattr(run, "stop_strings", []),
        batch_size=batch_size,
        show_progress=show_progress,
    )
    sampled = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, **decoding)
    greedy = GenerationConfig(do_sample=False, **decoding)
    samples = {}
    for name, model in (("policy", policy), ("baseline", other)):
        torch.manual_seed(seed)  # the same draws for both: differences come from the models
        on = model.lm.device  # π_init as the baseline samples on init_device
        samples[name] = sample_for_eval(
            model, tokenizer, prompt_rows, settings=sampled, desc=name, device=on, **sampling
        )
        samples[f"{name}_greedy"] = sample_for_eval(
            model, tokenizer, prompt_rows, settings=greedy, desc=f"{name}, greedy", device=on, **sampling
        )

    # Scores: the judge, the run's proxy reward, the gold score; the policy's KL to π_init
    def scorer(entry):
        if entry == "gold":
            return lambda *batch, texts, prompts: torch.tensor(builtin_gold_score(texts))
        score = load_reward(entry, tokenizer, placement=str(device))
        return lambda *batch, texts, prompts: score(*batch, prompts=prompts)

    weights = run.reward_weights or [1.0] * len(run.reward_model)
    proxies = [scorer(entry) for entry in run.reward_model]
    judged = scorer(judge)
    columns = {}
    for name, parts in samples.items():
        rows = {"judge": [], "reward": [], "kl_to_init": [], "length": []} | ({"gold": []} if builtin else {})
        for start, part in zip(range(0, len(texts), batch_size), parts):
            chunk = dict(texts=part.texts, prompts=texts[start : start + batch_size])
            rows["judge"].append(judged(*part.batch, **chunk))
            rows["reward"].append(sum(w * proxy(*part.batch, **chunk) for w, proxy in zip(weights, proxies)))
            if builtin:
                rows["gold"].append(torch.tensor(builtin_gold_score(part.texts)))
            if not name.endswith("_greedy"):  # a KL estimate needs responses sampled from the policy
                init_logprobs = forward_logprobs(init.lm, *part.batch, temperature=temperature)  # on init_device
                rows["kl_to_init"].append((part.logprobs.cpu() - init_logprobs.cpu()).sum(1))
            rows["length"].append(part.batch.response_mask.sum(1).float())
        columns[name] = {key: torch.cat([v.cpu() for v in values]).float() for key, values in rows.items() if values}
        columns[name]["texts"] = [t for part in parts for t in part.texts]
    rate, low, high = win_rate(columns["policy"]["judge"], columns["baseline"]["judge"], seed=seed)

    summary = {
        "run": run_dir,
        "baseline": baseline,
        "judge": judge,
        "prompts": len(texts),
        "win_rate": rate,
        "win_rate_low": low,
        "win_rate_high": high,
    }
    for name in samples:
        c = columns[name]
        summary[f"{name}/reward"] = c["reward"].mean().item()
        if builtin:
            summary[f"{name}/gold_score"] = c["gold"].mean().item()
        summary[f"{name}/distinct_2"] = distinct_n(c["texts"], 2)
        summary[f"{name}/response_length"] = c["length"].mean().item()
        if "kl_to_init" in c:
            summary[f"{name}/kl_to_init"] = c["kl_to_init"].mean().item()
            summary[f"{name}/kl_to_init_stderr"] = (c["kl_to_init"].std() / len(texts) ** 0.5).item()
    out = out or os.path.join(run_dir, f"eval-vs-{os.path.basename(baseline.rstrip('/'))}.jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        for i, prompt in enumerate(texts):
            row = {"prompt": prompt}
            for name in samples:
                c = columns[name]
                scores = {k: c[k][i].item() for k in ("judge", "reward", "gold", "kl_to_init") if k in c}
                row[name] = {"response": c["texts"][i], **scores}
            f.write(json.dumps(row) + "\n")
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def eval_table(summary: dict) -> str:
    """evaluate_run's summary for a terminal: the win rate, then one markdown row for each side."""
    lines = [
        f"{summary['run']}: win rate against {summary['baseline']} under {summary['judge']} "
        f"{summary['win_rate']:.3f} (95% bootstrap interval {summary['win_rate_low']:.3f}–"
        f"{summary['win_rate_high']:.3f}) on {summary['prompts']} held-out prompts",
        "| | proxy reward | gold score | KL to π_init (nats) | distinct-2 | response length |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("policy", "baseline", "policy_greedy", "baseline_greedy"):
        gold = summary.get(f"{name}/gold_score")
        gold = "–" if gold is None else f"{gold:+.3f}"
        kl = "–"
        if f"{name}/kl_to_init" in summary:
            kl = f"{summary[f'{name}/kl_to_init']:.2f} ± {summary[f'{name}/kl_to_init_stderr']:.2f}"
        lines.append(
            f"| {name.replace('_', ', ')} | {summary[f'{name}/reward']:+.3f} | {gold} | {kl} | "
            f"{summary[f'{name}/distinct_2']:.3f} | {summary[f'{name}/response_length']:.1f} |"
        )
    return "\n".join(lines)


# ---- `python evaluate.py RUN_DIR`: the command line of `./launch.sh eval` --------------------------------------------
if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="A run's policy against a baseline under a judge (evaluate_run).")
    parser.add_argument("run_dir", help="a finished run: runs/NAME, with args.json and policy/")
    parser.add_argument("--baseline", default="sft", help="sft (the run's starting policy) or another RUN_DIR")
    parser.add_argument("--judge", help="a --reward-model entry, or gold (the built-in default)")
    parser.add_argument("--prompts", type=int, help="held-out prompts (default: the run's --eval-prompts)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (full vocabulary)")
    parser.add_argument("--beta", type=float, default=1.0, help="ILQL runs: the decoding β")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    parser.add_argument("--seed", type=int, default=1, help="the sampling seed (the same for both policies)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--init-device", help="where π_init runs (default: --device), e.g. cpu or cuda:1")
    parser.add_argument("--out", help="the pairs' jsonl (default RUN_DIR/eval-vs-BASELINE.jsonl)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars (shown only in a terminal)")
    cli = parser.parse_args()
    library_bars(not cli.no_progress)
    s = evaluate_run(
        cli.run_dir,
        baseline=cli.baseline,
        judge=cli.judge,
        prompts=cli.prompts,
        temperature=cli.temperature,
        beta=cli.beta,
        batch_size=cli.batch_size,
        seed=cli.seed,
        device=cli.device,
        init_device=cli.init_device,
        out=cli.out,
        show_progress=not cli.no_progress,
    )
    print(eval_table(s))
