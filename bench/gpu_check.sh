#!/usr/bin/env bash
# One-GPU check (issue 19, item 7): run it whenever a GPU is lent; it aims at < 8 minutes on one H100 and prints
# one table (check | status | seconds | figure). What it covers:
#   gpu-tests     pytest -m gpu (the tests that skip without CUDA)
#   bf16/<cfg>    one bf16 training step of every tiny config (configs/**/tiny*.yaml, *_tiny.yaml) on CUDA
#   fsdp-1proc    FSDP2 through accelerate with one process (configs/accelerate/fsdp.yaml, bf16): 2 steps with a KL term
#                 (sharded reference) and sharded checkpoints, a resume to step 3, `renorm export` of the last one
#   zero2, zero3  DeepSpeed through accelerate, one process, 2 steps with 2 accumulation micro-batches (grad norm
#                 read from the engine); only when the optional `deepspeed` extra is installed, else "skipped"
#   memory-cuda   peak CUDA memory of token log-probs + backward at vocab 151,936 (4 x 1024 bf16 logits): the
#                 direct fp32 formula vs toolkit.hf.logprobs (chunked), and their ratio
#   engines-gpu   bench/engines_gpu.py (issue 22), shortened: s/step of renorm's hf, vllm (colocated) and server
#                 (+ a `vllm serve` on loopback) engines against TRL GRPOTrainer + vLLM colocate, 128 new tokens,
#                 1 warm-up + 2 steps each; only when vllm imports, else "skipped"; report in $OUT/engines_gpu.md
#   memory-host   bench/logprob_memory.py (host RSS, the recorded bench), one repeat
#   step-time     bench/onpolicy_skip.py, bench/video_embedding_reuse.py, bench/t2i_cfg_no_grad.py (CPU-time ratios,
#                 shortened) and bench/trainer_vs_trl.py when TRL (the `bench` extra) is installed
# Checks run in that order under their own time limits; once the budget (BUDGET_S, default 470 s) is spent the rest
# are reported "skipped (budget)". Not covered: multi-GPU runs (the 2-rank FSDP/DeepSpeed parity and resume tests
# run on CPU with gloo: tests/toolkit/train/test_fsdp.py, test_deepspeed.py).
# Usage: bash bench/gpu_check.sh        PY=python interpreter (default .venv/bin/python), OUT=results dir
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/gpu_check}
BUDGET_S=${BUDGET_S:-470}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=${PYTHONPATH:-$PWD}
START=$SECONDS
ROWS=()
mkdir -p "$OUT"

if ! "$PY" -c "import torch, transformers, accelerate, toolkit; assert torch.cuda.is_available(), 'no CUDA'" 2>"$OUT/setup.log"; then
  echo "gpu_check: $PY cannot import torch/transformers/accelerate/toolkit with CUDA (see $OUT/setup.log)" >&2
  cat "$OUT/setup.log" >&2
  exit 2
fi
ACCELERATE=$(dirname "$PY")/accelerate
export PY OUT ACCELERATE
has() { "$PY" -c "import $1" >/dev/null 2>&1; }

# run_check NAME LIMIT_S COMMAND...: runs COMMAND under a time limit, logs to $OUT/NAME.log, adds a table row.
# The figure is the last "FIGURE: ..." line of the log, else its last line mentioning a ratio, else its last line.
run_check() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - (SECONDS - START)))
  if ((left < 15)); then
    ROWS+=("$name|skipped (budget)|0|")
    return
  fi
  ((limit > left)) && limit=$left
  local log="$OUT/${name//\//_}.log" began=$SECONDS status=ok
  timeout "$limit" "$@" >"$log" 2>&1
  local rc=$?
  ((rc == 124)) && status="TIMEOUT (${limit}s)"
  ((rc != 0 && rc != 124)) && status="FAIL (rc $rc)"
  local figure
  figure=$(grep -h "^FIGURE: " "$log" | tail -1 | cut -c9-)
  [[ -z $figure ]] && figure=$(grep -hi "ratio" "$log" | tail -1)
  [[ -z $figure ]] && figure=$(tail -1 "$log")
  ROWS+=("$name|$status|$((SECONDS - began))|${figure:0:110}")
}

skip_check() { ROWS+=("$1|skipped ($2)|0|"); }

# ------------------------------------------------------------------------------------------------ checks
cat >"$OUT/tiny_bf16.py" <<'EOF'
"""One bf16 training step per tiny config on CUDA; prints one ROW line per config."""
import sys, time, traceback
from pathlib import Path
import torch
from tests.test_tiny_configs import CONFIGS, ROOT, config_for
from toolkit.train.runner import build_trainer

out = Path(sys.argv[1])
for path in CONFIGS:
    name = str(path.relative_to(ROOT / "configs"))
    began = time.perf_counter()
    try:
        overrides = ["trainer.num_steps=1", "trainer.save_every=0", "trainer.mixed_precision=bf16", "trainer.num_threads=4"]
        trainer = build_trainer(config_for(path, out / name.replace("/", "_"), *overrides))
        metrics, _ = trainer.step()
        torch.cuda.synchronize()
        device = next(trainer.policy.module.parameters()).device
        loss = metrics.get("loss/policy", float("nan"))
        status = "ok" if device.type == "cuda" and loss == loss else "FAIL"
        figure = f"device={device} loss/policy={loss:.4g} step_s={metrics.get('time/step_s', float('nan')):.2f}"
    except Exception as error:  # one config failing must not hide the others
        traceback.print_exc()
        status, figure = "FAIL", f"{type(error).__name__}: {error}".replace("|", "/").replace("\n", " ")
    print(f"ROW\tbf16/{name}\t{status}\t{time.perf_counter() - began:.0f}\t{figure[:110]}", flush=True)
EOF

cat >"$OUT/memory_cuda.py" <<'EOF'
"""Peak CUDA memory of fp32 token log-probs + backward at vocab 151,936: direct formula vs toolkit.hf.logprobs."""
import torch
from bench.logprob_memory import direct  # the formula the policies used before issue 19
from toolkit.hf.logprobs import token_log_probs

N, T, V = 4, 1024, 151936

def peak_gib(fn):
    torch.manual_seed(0)
    output = torch.randn(N, T + 1, V, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    tokens = torch.randint(V, (N, T), device="cuda")
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    (fn(output[:, :-1], tokens) * 0.5).sum().backward()
    torch.cuda.synchronize()
    value = (torch.cuda.max_memory_allocated() - base) / 2**30
    del output, tokens
    torch.cuda.empty_cache()
    return value

a, b = peak_gib(lambda l, t: direct(l, t, 1.0, entropy=False)[0]), peak_gib(lambda l, t: token_log_probs(l, t, 1.0))
print(f"FIGURE: direct {a:.2f} GiB, chunked {b:.2f} GiB above the logits: {a / b:.1f}x lower")
EOF

run_check gpu-tests 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests

run_check bf16-tiny-configs 170 "$PY" "$OUT/tiny_bf16.py" "$OUT/tiny"
while IFS=$'\t' read -r _ name status seconds figure; do
  ROWS+=("$name|$status|$seconds|$figure")
done < <(grep -h "^ROW" "$OUT/bf16-tiny-configs.log")

fsdp() {
  local run="$OUT/fsdp_run" common=(configs/demo/tiny_grpo.yaml "data.path=data/demo/letters.jsonl"
    trainer.prompts_per_step=4 trainer.group_size=2 trainer.num_minibatches=1 trainer.gradient_accumulation_steps=2
    sampler.max_new_tokens=8 objective.kl_coef=0.05 objective.entropy_coef=0.01 trainer.save_every=1
    trainer.progress=false)
  rm -rf "$run" "$OUT/fsdp_export"
  "$ACCELERATE" launch --config_file configs/accelerate/fsdp.yaml --num_processes 1 -m toolkit.cli train \
    "${common[@]}" "trainer.run_dir=$run" trainer.num_steps=2 &&
    "$ACCELERATE" launch --config_file configs/accelerate/fsdp.yaml --num_processes 1 -m toolkit.cli train \
      "${common[@]}" "trainer.run_dir=$run" trainer.num_steps=3 &&
    "$PY" -m toolkit.cli export "$run/checkpoints/step_00000003" "$OUT/fsdp_export" &&
    "$PY" - "$run" <<'EOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
sharded = sorted(p.name for p in (run / "checkpoints" / "step_00000003" / "sharded").iterdir())
last = records[-1]
print(f"FIGURE: steps {[r['step'] for r in records]} loss/kl={last.get('loss/kl', float('nan')):.3g} "
      f"grad_norm={last['optim/grad_norm']:.3g} shards={sharded}")
EOF
}
export -f fsdp
run_check fsdp-1proc 120 bash -c fsdp

zero() {
  local stage=$1 run="$OUT/zero${1}_run"
  rm -rf "$run"
  "$ACCELERATE" launch --config_file "configs/accelerate/deepspeed_zero${stage}.yaml" --num_processes 1 \
    -m toolkit.cli train configs/demo/tiny_grpo.yaml "data.path=data/demo/letters.jsonl" "trainer.run_dir=$run" \
    trainer.num_steps=2 trainer.prompts_per_step=4 trainer.group_size=2 trainer.num_minibatches=1 \
    trainer.gradient_accumulation_steps=2 objective.kl_coef=0.05 objective.entropy_coef=0.01 trainer.progress=false &&
    "$PY" -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; \
print('FIGURE: steps', [x['step'] for x in r], 'grad_norm', [round(x['optim/grad_norm'], 4) for x in r])" \
      "$run/metrics.jsonl"
}
export -f zero
if has deepspeed; then
  run_check zero2 90 bash -c "zero 2"
  run_check zero3 90 bash -c "zero 3"
else
  skip_check zero2 "deepspeed not installed"
  skip_check zero3 "deepspeed not installed"
fi

run_check memory-cuda 60 "$PY" "$OUT/memory_cuda.py"
if has vllm; then
  # Three vLLM starts (compile + CUDA graphs) dominate: ~30 s each expected on an H100 (not measured yet).
  run_check engines-gpu 180 "$PY" bench/engines_gpu.py --sides hf vllm server trl-vllm --warmup 1 --steps 2 \
    --max-new-tokens 128 --side-timeout 120 --out "$OUT/engines_gpu.md"
else
  skip_check engines-gpu "vllm not installed: pip install -e '.[vllm]'"
fi
run_check memory-host 90 "$PY" bench/logprob_memory.py --repeats 1 --out "$OUT/logprob_memory.md"
run_check onpolicy-skip 60 "$PY" bench/onpolicy_skip.py --warmup 1 --steps 2 --repeats 2 --out "$OUT/onpolicy_skip.md"
run_check video-embedding-reuse 75 "$PY" bench/video_embedding_reuse.py --warmup 1 --steps 1 --repeats 2 \
  --data-dir "$OUT/video_data" --out "$OUT/video_embedding_reuse.md"
run_check t2i-cfg-no-grad 60 "$PY" bench/t2i_cfg_no_grad.py --rows 8 --repeats 2 --steps 2 --out "$OUT/t2i_cfg_no_grad.md"
if has trl; then
  run_check trainer-vs-trl 90 "$PY" bench/trainer_vs_trl.py --warmup 1 --steps 3 --repeats 1 \
    --output "$OUT/trainer_vs_trl.json"
else
  skip_check trainer-vs-trl "trl not installed: pip install -e '.[bench]'"
fi

# ------------------------------------------------------------------------------------------------ the table
{
  echo "check|status|seconds|figure"
  echo "---|---|---|---"
  printf '%s\n' "${ROWS[@]}"
} | column -t -s '|' | tee "$OUT/table.txt"
"$PY" -c "import torch; print(torch.cuda.get_device_name(0), 'torch', torch.__version__)" | tee -a "$OUT/table.txt"
echo "total $((SECONDS - START)) s; logs in $OUT/"
! printf '%s\n' "${ROWS[@]}" | grep -q "|FAIL\||TIMEOUT"
