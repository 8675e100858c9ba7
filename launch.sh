#!/usr/bin/env bash
# launch.sh - start one of the single-file RLHF scripts (ppo apa awr grpo ilql alol dpo pro) on CPU, one or more GPUs, or
# several nodes, with torchrun (default) or the deepspeed launcher. Everything after `--` goes to the script.
# It runs in the caller's working directory, as `python SCRIPT.py` from there would: relative paths (run folders,
# data, --output-dir) and `module:function` rewards and judges resolve from there; the scripts are found beside this
# file. Python, torchrun and deepspeed: the active virtual environment's, else the project's .venv beside this file.
# Run ./launch.sh --help for examples.
set -euo pipefail
REPO=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
SCRIPTS="ppo apa awr grpo ilql alol dpo pro"
# No virtual environment active but the README's .venv is here: use it (python, torchrun, deepspeed).
[[ -z ${VIRTUAL_ENV:-} && -x $REPO/.venv/bin/python ]] && export PATH="$REPO/.venv/bin:$PATH"

usage() {
  cat <<'EOF'
Usage: ./launch.sh SCRIPT [options] [-- SCRIPT_ARGS...]
  SCRIPT            one of: ppo apa awr grpo ilql alol dpo pro (".py" optional)
  --gpus N          GPUs per node (default: all that `nvidia-smi -L` lists; 0 = run on CPU)
  --procs N         CPU processes when running on CPU (default 1)
  --deepspeed       use the deepspeed launcher instead of torchrun (GPU only)
  --zero N          pass --zero-stage N to the script (default: the script's own default)
  --nnodes N --node-rank R --master ADDR:PORT   multi-node; run the same line on every node, R = 0..N-1
  --hostfile FILE   deepspeed multi-node: hosts and slots come from FILE (implies --deepspeed)
  --dry-run         print the command instead of running it
OMP_NUM_THREADS defaults to max(1, nproc / processes-per-node) when unset.
  ./launch.sh compare [--seeds '1 2 3'] [--episodes 8192] [-- ARGS]   PPO, APA, AWR, GRPO, Dr. GRPO, RLOO: built-in task
  ./launch.sh compare --offline [--steps 128] [--seeds '1 2 3']      NLL, wBC, A-LoL, DPO, PRO, ILQL, same steps
  ./launch.sh eval RUN_DIR [--judge ENTRY] [--baseline sft|RUN_DIR]  win rate of a run's policy, KL to π_init
  ./launch.sh paper NAME [--size 125m|1b|6b] [--dry-run]   a released experiment (--list: all, with GPUs)
  ./launch.sh bench [--batch-size 64] [--scripts ppo apa awr] ...    throughput vs bare generate / training loop
Examples:
  ./launch.sh ppo                                     # CPU-only machine: plain `python ppo.py`
  ./launch.sh ppo --gpus 0 --procs 2 -- --zero-stage 0  # two CPU processes via torchrun
  ./launch.sh ppo --gpus 8 --zero 2 -- --dataset ... # one node, 8 GPUs, ZeRO-2
  ./launch.sh ppo --gpus 8 --deepspeed --zero 3      # same via the deepspeed launcher
  two nodes with torchrun (run one line on each node):
    node 0: ./launch.sh ppo --gpus 8 --nnodes 2 --node-rank 0 --master 10.0.0.1:29500 -- --zero-stage 3
    node 1: ./launch.sh ppo --gpus 8 --nnodes 2 --node-rank 1 --master 10.0.0.1:29500 -- --zero-stage 3
  deepspeed with a hostfile (lines like "10.0.0.1 slots=8"; run once, on the first host):
    ./launch.sh ppo --hostfile hosts.txt --master 10.0.0.1:29500 --zero 3 -- --dataset ...
EOF
}
die() { echo "launch.sh: $*" >&2; exit 2; }
int() { [[ $2 =~ ^[0-9]+$ ]] || die "$1 needs a non-negative integer, got '$2'"; }
# A python on PATH with the packages every script imports, else the project's .venv, else one line on how to install.
has_packages() {
  "$1" -c 'import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))' \
    torch transformers tyro 2>/dev/null
}
need_python() {
  local py venv="no $REPO/.venv"
  py=$(command -v python || true)
  [[ -n $py ]] && has_packages "$py" && return
  if [[ -x $REPO/.venv/bin/python ]] && has_packages "$REPO/.venv/bin/python"; then
    export PATH="$REPO/.venv/bin:$PATH"
    return
  fi
  [[ -x $REPO/.venv/bin/python ]] && venv="$REPO/.venv lacks them too"
  die "no python with torch, transformers and tyro (python on PATH: ${py:-none}; $venv); install them:" \
    "python3 -m venv $REPO/.venv && $REPO/.venv/bin/pip install -r $REPO/requirements.txt"
}

# ---- compare: the online methods on the built-in task, same sampled responses, several seeds, one table ------------
# name  script  its own arguments (every run also gets --seed, --total-episodes and the output folder)
ONLINE_METHODS="ppo:ppo:
apa:apa:
awr:awr:
grpo:grpo:
dr_grpo:grpo:--advantage-estimator dr_grpo --loss-aggregation constant
rloo:grpo:--advantage-estimator rloo --kl-in-reward"
compare() {
  local seeds="1 2 3" episodes=8192 methods="" out="runs/compare-$(date +%Y%m%d-%H%M%S)" name script own seed start
  if [[ ${1:-} == --offline ]]; then shift; compare_offline "$@"; return; fi
  while (($#)); do
    case $1 in
      --seeds) seeds=$2; shift 2 ;;
      --episodes) int "$1" "$2"; episodes=$2; shift 2 ;;
      --methods) methods=$2; shift 2 ;;
      --out) out=$2; shift 2 ;;
      -h|--help) echo "./launch.sh compare [--seeds '1 2 3'] [--episodes 8192] [--methods 'ppo grpo ...'] [--out DIR]" \
                      "[-- ARGS for every script]"; exit 0 ;;
      --) shift; break ;;
      *) die "compare: unknown option '$1' (see ./launch.sh compare --help)" ;;
    esac
  done
  mkdir -p "$out"; : > "$out/wall_times.txt"
  while IFS=: read -r name script own; do
    [[ -z $methods || " $methods " == *" $name "* ]] || continue
    for seed in $seeds; do
      echo "compare: $name seed $seed ($episodes sampled responses) -> $out/$name-$seed.log"
      start=$EPOCHREALTIME
      # shellcheck disable=SC2086  # $own: the method's own arguments, split on purpose
      python "$REPO/$script.py" $own --seed "$seed" --total-episodes "$episodes" --exp-name "$name" \
        --output-dir "$out/$name" "$@" > "$out/$name-$seed.log" 2>&1 \
        || die "compare: $name seed $seed failed; see $out/$name-$seed.log"
      echo "$name $seed $start $EPOCHREALTIME" >> "$out/wall_times.txt"
      python "$REPO/evaluate.py" "$(ls -d "$out/$name/${name}__${seed}__"*/ | tail -1)" \
        --out "$out/eval/$name-$seed.jsonl" >> "$out/$name-$seed.log" 2>&1 \
        || die "compare: evaluating $name seed $seed failed; see $out/$name-$seed.log"
    done
  done <<< "$ONLINE_METHODS"
  python - "$out" <<'PY'
import glob, json, os, statistics as st, sys
out, rows, curves = sys.argv[1], {}, {}
wins = {}
for path in glob.glob(os.path.join(out, "eval", "*.json")):
    wins.setdefault(os.path.basename(path).rsplit("-", 1)[0], []).append(json.load(open(path))["win_rate"])
walls = {}
for line in open(os.path.join(out, "wall_times.txt")):
    algo, seed, start, end = line.split()
    walls.setdefault(algo, []).append(float(end) - float(start))
for path in sorted(glob.glob(os.path.join(out, "*", "*", "metrics.jsonl"))):
    algo = path.split(os.sep)[-3]
    evals = [r for r in map(json.loads, open(path)) if "eval/reward" in r]
    rows.setdefault(algo, []).append(evals[-1])
    rows.setdefault("SFT (before)", []).append(evals[0])
    curves.setdefault(algo, []).append([(r["eval/kl_to_ref"], r["eval/reward"], r.get("eval/gold_score")) for r in evals])
fmt = lambda xs: f"{st.mean(xs):+.3f} ± {st.stdev(xs) if len(xs) > 1 else 0.0:.3f}"
lines = ["| algorithm | seeds | proxy reward | gold score | KL to π_init (nats) | win rate vs SFT (gold) | wall time (s) |",
         "|---|---|---|---|---|---|---|"]
first = next(iter(walls))  # the first method run: SFT's row repeats once per seed of it
for algo in ["SFT (before)", "ppo", "apa", "awr", "grpo", "dr_grpo", "rloo"]:
    if algo in rows:
        r = rows[algo][:len(rows[first])] if algo == "SFT (before)" else rows[algo]
        w = walls.get(algo)
        wall = f"{st.mean(w):.0f} ± {st.stdev(w) if len(w) > 1 else 0.0:.0f}" if w else "–"
        win = f"{st.mean(wins[algo]):.3f} ± {st.stdev(wins[algo]) if len(wins[algo]) > 1 else 0.0:.3f}" if algo in wins else "0.5"
        lines.append(f"| {algo} | {len(r)} | {fmt([x['eval/reward'] for x in r])} | "
                     f"{fmt([x.get('eval/gold_score', float('nan')) for x in r])} | {fmt([x['eval/kl_to_ref'] for x in r])} | "
                     f"{win} | {wall} |")
table = "\n".join(lines)
print(table)
open(os.path.join(out, "table.md"), "w").write(table + "\n")
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("matplotlib is not installed: no reward-vs-KL picture (pip install matplotlib)")
    sys.exit(0)
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
colors = ["tab:green", "tab:blue", "tab:orange", "tab:red", "tab:purple", "tab:brown"]
for (algo, runs), color in zip(sorted(curves.items()), colors):
    for i, run in enumerate(runs):
        kl, reward, gold = zip(*run)
        axes[0].plot(kl, reward, "o-", color=color, alpha=0.7, label=algo if i == 0 else None)
        if gold[0] is not None:
            axes[1].plot(kl, gold, "o-", color=color, alpha=0.7, label=algo if i == 0 else None)
for ax, name in zip(axes, ["proxy reward", "gold score"]):
    ax.set_xlabel("KL to π_init (nats per response)"); ax.set_ylabel(f"held-out {name}"); ax.legend()
fig.tight_layout()
fig.savefig(os.path.join(out, "reward_vs_kl.png"), dpi=100)
print(f"wrote {os.path.join(out, 'reward_vs_kl.png')}")
PY
}

# ---- compare --offline: the offline methods on the built-in rows, same steps, one evaluation, one table -------------
# name  script  its own arguments (every run also gets --seed, the steps, --mini-batch-size 16 and the output folder)
OFFLINE_METHODS="nll:alol:--algorithm nll
wbc:alol:--algorithm wbc
a_lol:alol:--algorithm a_lol --no-scale-steps
a_lol_seq:alol:--algorithm a_lol_seq --no-scale-steps
dpo:dpo:
dpo_ref_free:dpo:--reference-free
pro:pro:
ilql:ilql:"
compare_offline() {
  local seeds="1 2 3" steps=128 betas="1 4" methods="" out="runs/compare-offline-$(date +%Y%m%d-%H%M%S)"
  local line name script own seed start run_dir beta steps_args
  while (($#)); do
    case $1 in
      --seeds) seeds=$2; shift 2 ;;
      --steps) int "$1" "$2"; steps=$2; shift 2 ;;
      --methods) methods=$2; shift 2 ;;
      --ilql-betas) betas=$2; shift 2 ;;
      --out) out=$2; shift 2 ;;
      -h|--help) echo "./launch.sh compare --offline [--seeds '1 2 3'] [--steps 128] [--methods 'nll dpo ...']" \
                      "[--ilql-betas '1 4'] [--out DIR] [-- ARGS for every script]"; exit 0 ;;
      --) shift; break ;;
      *) die "compare --offline: unknown option '$1' (see ./launch.sh compare --offline --help)" ;;
    esac
  done
  # ILQL counts epochs over the 1024 built-in rows, 64 steps of 16 rows each
  ((steps % 64 == 0)) || die "compare --offline: --steps must be a multiple of 64 (one ILQL epoch of the built-in rows)"
  mkdir -p "$out"; : > "$out/wall_times.txt"
  while IFS=: read -r name script own; do
    [[ -z $methods || " $methods " == *" $name "* ]] || continue
    if [[ $script == ilql ]]; then
      steps_args=(--offline-epochs $((steps / 64)) --eval-every $((steps / 64)))
    else
      steps_args=(--total-steps "$steps" --eval-every "$steps")
    fi
    for seed in $seeds; do
      echo "compare --offline: $name seed $seed ($steps steps) -> $out/$name-$seed.log"
      start=$EPOCHREALTIME
      # shellcheck disable=SC2086  # $own: the method's own arguments, split on purpose
      python "$REPO/$script.py" $own "${steps_args[@]}" --mini-batch-size 16 --seed "$seed" --exp-name "$name" \
        --output-dir "$out/$name-$seed" "$@" > "$out/$name-$seed.log" 2>&1 \
        || die "compare --offline: $name seed $seed failed; see $out/$name-$seed.log"
      echo "$name $seed $start $EPOCHREALTIME" >> "$out/wall_times.txt"
      run_dir=$(ls -d "$out/$name-$seed"/*/)
      for beta in $([[ $script == ilql ]] && echo "$betas" || echo 1); do
        local label=$name; [[ $script == ilql ]] && label="ilql_beta_$beta"
        python "$REPO/evaluate.py" "$run_dir" --beta "$beta" --out "$out/eval/$label-$seed.jsonl" \
          >> "$out/$name-$seed.log" 2>&1 \
          || die "compare --offline: evaluating $name seed $seed failed; see $out/$name-$seed.log"
      done
    done
  done <<< "$OFFLINE_METHODS"
  python - "$out" $(cut -d: -f1 <<< "$OFFLINE_METHODS") <<'PY'
import glob, json, os, statistics as st, sys
out, order = sys.argv[1], sys.argv[2:]  # the methods in OFFLINE_METHODS' order
walls, evals = {}, {}
for line in open(os.path.join(out, "wall_times.txt")):
    name, seed, start, end = line.split()
    walls.setdefault(name, []).append(float(end) - float(start))
for path in sorted(glob.glob(os.path.join(out, "eval", "*.json"))):
    label = os.path.basename(path).rsplit("-", 1)[0]
    evals.setdefault(label, []).append(json.load(open(path)))
evals = dict(sorted(evals.items(), key=lambda item: (order.index(item[0].split("_beta_")[0]), item[0])))
def fmt(xs, digits=3, sign="+"):
    spread = st.stdev(xs) if len(xs) > 1 else 0.0
    return f"{st.mean(xs):{sign}.{digits}f} ± {spread:.{digits}f}"
lines = ["| method | seeds | gold score | gold score, greedy | proxy reward (raw) | KL to π_init (nats) | distinct-2 "
         "| win rate vs SFT (gold) | train wall (s) |", "|---|---|---|---|---|---|---|---|---|"]
first = next(iter(evals.values()))[0]
lines.append(f"| SFT (π_init) | – | {first['baseline/gold_score']:+.3f} | {first['baseline_greedy/gold_score']:+.3f} | "
             f"{first['baseline/reward']:+.3f} | 0 | {first['baseline/distinct_2']:.3f} | 0.5 | – |")
points = {}
for label, runs in evals.items():
    wall = walls.get(label.split("_beta_")[0] if label.startswith("ilql") else label, [])
    gold = [r["policy/gold_score"] for r in runs]
    kl = [r["policy/kl_to_init"] for r in runs]
    points[label] = (kl, gold)
    lines.append(f"| {label.replace('_beta_', ' β=')} | {len(runs)} | {fmt(gold)} | "
                 f"{fmt([r['policy_greedy/gold_score'] for r in runs])} | "
                 f"{fmt([r['policy/reward'] for r in runs])} | {fmt(kl, 2, '')} | "
                 f"{fmt([r['policy/distinct_2'] for r in runs], 3, '')} | {fmt([r['win_rate'] for r in runs], 3, '')} | "
                 f"{fmt(wall, 1, '') if wall else '–'} |")
table = "\n".join(lines)
print(f"{first['prompts']} held-out prompts; each policy sampled at temperature 1 over the full vocabulary (one seed)"
      " and decoded greedily; mean ± std over training seeds")
print(table)
open(os.path.join(out, "table.md"), "w").write(table + "\n")
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("matplotlib is not installed: no gold-vs-KL picture (pip install matplotlib)")
    sys.exit(0)
fig, ax = plt.subplots(figsize=(6, 4))
for label, (kl, gold) in points.items():
    ax.errorbar(st.mean(kl), st.mean(gold), xerr=st.stdev(kl) if len(kl) > 1 else 0,
                yerr=st.stdev(gold) if len(gold) > 1 else 0, fmt="o", capsize=3, label=label.replace("_beta_", " β="))
ax.axhline(first["baseline/gold_score"], color="gray", ls="--", label="SFT")
ax.set_xlabel("KL to π_init (nats per response)"); ax.set_ylabel("held-out gold score"); ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(os.path.join(out, "gold_vs_kl.png"), dpi=100)
print(f"wrote {os.path.join(out, 'gold_vs_kl.png')}")
PY
}

# ---- paper: a released experiment = one script's --preset (its values sit beside the script's Args) + a GPU layout --
PAPER="apa-hh awr-hh ppo-hh apa-tldr ppo-tldr ilql-hh apa-off-hh awr-off-hh alol-hh dpo-hh pro-hh"
preset() {  # preset NAME SIZE: sets p_script, p_preset, p_gpus, p_layout, p_mem and the layout's arguments p_args
  local name=$1 size=$2
  case $size in
    125m|1b|6b) ;;
    *) die "paper: --size must be 125m, 1b or 6b, got '$size'" ;;
  esac
  # one training process; π_ref, the value model and the reward model on the next three GPUs, as released
  local four=(--ref-device cuda:1 --value-device cuda:2 --reward-device cuda:3)
  p_gpus=1
  p_layout="4 GPUs: policy cuda:0 (the one training process), π_ref cuda:1, value cuda:2, reward cuda:3"
  p_mem="policy/value ≈ 0.6/4/21 GB, π_ref ≈ 0.3/2/14 GB, RM (GPT-J 6B) ≈ 12 GB (for 125m/1b/6b; bf16 weights + AdamW"
  p_mem+=" state of the trained blocks, activations not included)"
  case $name in
    apa-hh|awr-hh|ppo-hh)
      p_script=${name%%-*} p_preset=hh-$size p_args=("${four[@]}") ;;
    apa-tldr|ppo-tldr)
      [[ $size == 6b ]] || die "paper: $name has one size, the 6B GPT-J SFT model: drop --size or pass --size 6b"
      p_script=${name%%-*} p_preset=tldr p_args=("${four[@]}")
      p_mem="policy/value ≈ 40 GB, π_ref ≈ 12 GB, RM ≈ 12 GB (GPT-J 6B; 8 trained blocks; activations not included)" ;;
    apa-off-hh|awr-off-hh)
      p_script=${name%%-*} p_preset=offline-hh-$size p_args=("${four[@]}") ;;
    ilql-hh)
      p_script=ilql p_preset=hh-$size p_args=(--reward-device cuda:1)
      p_layout="2 GPUs: the LM and its heads cuda:0; the reward model (evaluation only) cuda:1"
      p_mem="LM + heads ≈ 1/4/30 GB (two 2h×50k Q heads and their targets), RM ≈ 12 GB" ;;
    alol-hh|dpo-hh|pro-hh)
      p_script=${name%%-*} p_preset=hh-$size p_args=(--reward-device cuda:1)
      p_layout="2 GPUs: policy (π_ref = its adapter off) cuda:0, reward model cuda:1"
      p_mem="policy ≈ 0.3/2/14 GB bf16 + adapter with its AdamW state ≈ 0.15/0.5/2.1 GB (9/34/134 M params), RM ≈ 3 GB" ;;
    *) die "paper: unknown preset '$name'; one of: $PAPER (./launch.sh paper --list)" ;;
  esac
}

paper() {
  local size="" name="" dry=() p_script p_preset p_gpus p_layout p_mem p_args
  while (($#)); do
    case $1 in
      --list) for name in $PAPER; do
                local sz=1b; if [[ $name == *tldr ]]; then sz=6b; fi
                preset "$name" "$sz"
                printf '%-11s %-7s --preset %-15s %s\n%17s%s\n' "$name" "$p_script.py" "$p_preset" "$p_layout" "" "$p_mem"
              done; exit 0 ;;
      --size) (($# >= 2)) || die "--size needs 125m, 1b or 6b"; size=$2; shift 2 ;;
      --dry-run) dry=(--dry-run); shift ;;
      -h|--help) echo "./launch.sh paper NAME [--size 125m|1b|6b] [--dry-run] [-- extra script args]; --list"; exit 0 ;;
      --) shift; break ;;
      -*) die "paper: unknown option '$1' (./launch.sh paper --help)" ;;
      *) name=$1; shift ;;
    esac
  done
  [[ -n $name ]] || die "paper: name a preset (./launch.sh paper --list)"
  if [[ -z $size && $name == *tldr ]]; then size=6b; fi  # TL;DR has one size
  preset "$name" "${size:-1b}"
  exec bash "$REPO/launch.sh" "$p_script" --gpus "$p_gpus" "${dry[@]}" -- --preset "$p_preset" "${p_args[@]}" "$@"
}

# ---- subcommands ---------------------------------------------------------------------------------------------------
case "${1:-}" in
  ""|-h|--help) usage; exit 0 ;;
  compare) shift; need_python; compare "$@"; exit 0 ;;
  eval) shift; need_python; exec python "$REPO/evaluate.py" "$@" ;;
  paper) shift; paper "$@" ;;
  bench) shift; need_python; [[ -n ${OMP_NUM_THREADS:-} ]] || export OMP_NUM_THREADS=$(nproc)
         exec python "$REPO/tests/benchmark.py" "$@" ;;
esac

# ---- parse -----------------------------------------------------------------------------------------------------------
name=${1%.py}; shift
[[ " $SCRIPTS " == *" $name "* ]] || die "unknown script '$name'; use one of: $SCRIPTS"
have=$(for s in $SCRIPTS; do if [[ -f $REPO/$s.py ]]; then printf '%s ' "$s"; fi; done)
[[ -f $REPO/$name.py ]] || die "$name.py does not exist in $REPO yet; write it first, or launch an existing one:" \
  "${have% }"
gpus="" gpus_given="" procs="" ds=0 zero="" nnodes="" rank="" master="" hostfile="" dry=0
while (($#)); do
  case $1 in
    --gpus|--procs|--zero|--nnodes|--node-rank|--master|--hostfile) (($# >= 2)) || die "$1 needs a value" ;;&
    --gpus) int "$1" "$2"; gpus=$2; gpus_given=1; shift 2 ;;
    --procs) int "$1" "$2"; procs=$2; shift 2 ;;
    --zero) [[ $2 =~ ^[0-3]$ ]] || die "--zero needs 0, 1, 2 or 3"; zero=$2; shift 2 ;;
    --nnodes) int "$1" "$2"; nnodes=$2; shift 2 ;;
    --node-rank) int "$1" "$2"; rank=$2; shift 2 ;;
    --master) master=$2; shift 2 ;;
    --hostfile) [[ -f $2 ]] || die "hostfile '$2' not found"; hostfile=$2; ds=1; shift 2 ;;
    --deepspeed) ds=1; shift ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (script arguments go after --; see ./launch.sh --help)" ;;
  esac
done
if [[ -z $gpus && -n $hostfile ]]; then gpus=-1   # GPUs per host come from the hostfile's slots
elif [[ -z $gpus ]]; then gpus=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true); fi
[[ -n $procs && $gpus -ne 0 ]] && die "--procs is for CPU runs; with GPUs use --gpus N (or --gpus 0 --procs N for CPU)"
[[ -z $procs || $procs -ge 1 ]] || die "--procs must be at least 1"
((gpus != 0 || ds == 0)) || die "deepspeed launcher is GPU-only here; on CPU use the default torchrun launcher (drop --deepspeed/--hostfile)"
addr="" port=""
if [[ -n $master ]]; then
  addr=${master%:*}; port=29500; [[ $master == *:* ]] && port=${master##*:}
  [[ -n $addr && $port =~ ^[0-9]+$ ]] || die "--master needs ADDR:PORT, got '$master'"
fi
multi=0; [[ -n $nnodes || -n $rank || -n $master || -n $hostfile ]] && multi=1
if [[ -n $nnodes && $nnodes -gt 1 && -z $hostfile ]]; then
  [[ -n $rank && -n $master ]] || die "--nnodes $nnodes needs --node-rank R and --master ADDR:PORT on every node"
  ((rank < nnodes)) || die "--node-rank must be below --nnodes ($nnodes)"
fi
nproc_node=$(( gpus != 0 ? gpus : ${procs:-1} ))
zero_args=(); [[ -n $zero ]] && zero_args=(--zero-stage "$zero")

# ---- build the command -----------------------------------------------------------------------------------------------
if ((ds)); then
  cmd=(deepspeed)
  if [[ -n $hostfile ]]; then
    cmd+=(--hostfile "$hostfile"); [[ -n $nnodes ]] && cmd+=(--num_nodes "$nnodes")
  else
    cmd+=(--num_nodes "${nnodes:-1}")
    [[ -n $rank ]] && cmd+=(--no_ssh --node_rank "$rank")   # torchrun-style: same line on every node
  fi
  [[ -z $hostfile || -n $gpus_given ]] && cmd+=(--num_gpus "$gpus")
  [[ -n $addr ]] && cmd+=(--master_addr "$addr" --master_port "$port")
elif ((gpus == 0 && nproc_node == 1 && multi == 0)); then
  cmd=(python)   # the scripts set up a world of one themselves
else
  cmd=(torchrun --nproc_per_node "$nproc_node")
  [[ -n $nnodes ]] && cmd+=(--nnodes "$nnodes")
  [[ -n $rank ]] && cmd+=(--node_rank "$rank")
  [[ -n $addr ]] && cmd+=(--master_addr "$addr" --master_port "$port")
fi
cmd+=("$REPO/$name.py" "${zero_args[@]}" "$@")
[[ -n ${OMP_NUM_THREADS:-} ]] || ((nproc_node < 0)) || export OMP_NUM_THREADS=$(( $(nproc) / nproc_node > 1 ? $(nproc) / nproc_node : 1 ))

if ((dry)); then
  [[ -n ${OMP_NUM_THREADS:-} ]] && printf 'OMP_NUM_THREADS=%q ' "$OMP_NUM_THREADS"
  printf '%q ' "${cmd[@]}" | sed 's/ $//'; echo
  exit 0
fi
need_python
command -v "${cmd[0]}" >/dev/null \
  || die "'${cmd[0]}' is not on PATH beside $(command -v python); pip install -r $REPO/requirements.txt"
exec "${cmd[@]}"
