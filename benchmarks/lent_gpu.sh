#!/usr/bin/env bash
# One call on a lent GPU machine (16 CPU cores, one GPU, no package index), in this order:
#   1. the machine: GPU, CPU model and its bf16 instructions, library versions;
#   2. the GPU benchmark: a random Llama-1B-shaped model in bf16, ours against HF Trainer, MFU;
#   3. the CPU benchmark in bf16 on two physical cores with the GPU hidden (SmolLM2's shape,
#      random weights: SmolLM2's own weights are 270 MB and do not travel), after a profile of
#      the recipe's step there.
# It needs what the machine's Python lacks as wheels in .whl (transformers and peft at the
# versions pyproject.toml resolves to, pydantic with its dependencies) and SmolLM2's tokenizer
# files in $TOK; both are git-ignored and travel with `carry`. JSON lines go to stdout and to
# $OUT, logs to $OUT.
set -u
OUT=${OUT:-$(mktemp -d)}
PY=${PY:-python3}
TOK=${TOK:-.devcarry/smollm2-tokenizer}
GPU_STEPS=${GPU_STEPS:-30}
CPU_STEPS=${CPU_STEPS:-12}
WHEELS=${WHEELS-.whl}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -n "$WHEELS" ] && [ -d "$WHEELS" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

{
  nvidia-smi -L 2>&1
  grep -m1 'model name' /proc/cpuinfo
  echo "cpus: $(nproc); flags: $(grep -o -w -E 'avx2|avx512f|avx512_bf16|amx_tile|amx_bf16' \
    /proc/cpuinfo | sort -u | tr '\n' ' ')"
  "$PY" -c 'import torch, transformers, peft
print("torch", torch.__version__, "transformers", transformers.__version__, "peft",
      peft.__version__, "cuda", torch.cuda.is_available(),
      "mkldnn bf16", torch.ops.mkldnn._is_mkldnn_bf16_supported())'
} | tee "$OUT/machine.txt"

if "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  timeout 200 "$PY" -m benchmarks.train --random-weights llama-1b --tokenizer "$TOK" \
    --steps "$GPU_STEPS" 2>"$OUT/gpu_train.log" | grep --line-buffered '^{"name' \
    | tee "$OUT/gpu_train.json"
  tail -n 3 "$OUT/gpu_train.log"
fi

# Two CPUs on distinct physical cores, one thread each.
cpus=$(lscpu -p=CPU,CORE 2>/dev/null | grep -v '^#' | sort -t, -k2,2n -u | head -n 2 \
  | cut -d, -f1 | paste -sd, -)
echo "CPU runs on CPUs ${cpus:=0,1}"
on_two_cores() { CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=2 taskset -c "$cpus" "$@"; }
on_two_cores timeout 100 "$PY" -m benchmarks.profile_train --random-weights smollm2-135m \
  --tokenizer "$TOK" --steps 5 >"$OUT/cpu_profile.json" 2>"$OUT/cpu_profile.log"
"$PY" -c 'import json, sys
d = json.load(open(sys.argv[1]))
print({k: v for k, v in d.items() if k != "top"})
for t in d["top"][:15]: print(t)' "$OUT/cpu_profile.json" || tail -n 5 "$OUT/cpu_profile.log"
on_two_cores timeout 300 "$PY" -m benchmarks.train --random-weights smollm2-135m \
  --tokenizer "$TOK" --steps "$CPU_STEPS" 2>"$OUT/cpu_train.log" | grep --line-buffered '^{"name' \
  | tee "$OUT/cpu_train.json"
tail -n 3 "$OUT/cpu_train.log"
