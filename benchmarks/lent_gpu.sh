#!/usr/bin/env bash
# One call on a lent GPU machine (16 CPU cores, one GPU, no package index): the machine (GPU,
# CPU model and its bf16 instructions, library versions), then the parts named in $PARTS, in
# their order:
#   gpu_train    the GPU benchmark: a random Llama-1B-shaped model in bf16, ours against HF
#                Trainer, with MFU;
#   gpu_profile  the recipe's step on that model under the profiler (GPU and host time);
#   attention    per-example attention kernels, sdpa against explicit, on two CPU cores;
#   cpu_profile  the recipe's step under the profiler on two CPU cores (GPU hidden);
#   cpu_train    the CPU benchmark in bf16 on two physical cores with the GPU hidden
#                ($CPU_ROUNDS rounds in alternating order).
# The CPU parts use SmolLM2's shape with random weights (SmolLM2's own weights are 270 MB and
# do not travel).
# It needs what the machine's Python lacks as wheels in .whl (transformers and peft at the
# versions pyproject.toml resolves to, pydantic with its dependencies) and SmolLM2's tokenizer
# files in $TOK; both are git-ignored (.git/info/exclude) and travel with `carry`. Made with:
#   pip download -d .whl --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 transformers==5.24.0 peft==0.21.2 \
#     pydantic==2.14.4 pydantic_core==2.50.5 annotated-types typing-inspection \
#     typing_extensions==4.16.0
#   mkdir -p .devcarry/smollm2-tokenizer && cp <the cached SmolLM2 import>/{config,tokenizer,\
#     tokenizer_config,generation_config}.json .devcarry/smollm2-tokenizer/
# JSON lines go to stdout and to $OUT, logs to $OUT.
set -u
OUT=${OUT:-$(mktemp -d)}
PY=${PY:-python3}
TOK=${TOK:-.devcarry/smollm2-tokenizer}
GPU_STEPS=${GPU_STEPS:-30}
CPU_STEPS=${CPU_STEPS:-12}
CPU_ROUNDS=${CPU_ROUNDS:-1}
PARTS=${PARTS:-gpu_train cpu_profile cpu_train}
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

# Two CPUs on distinct physical cores, one thread each.
cpus=$(lscpu -p=CPU,CORE 2>/dev/null | grep -v '^#' | sort -t, -k2,2n -u | head -n 2 \
  | cut -d, -f1 | paste -sd, -)
echo "CPU parts run on CPUs ${cpus:=0,1}"
on_two_cores() { CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=2 taskset -c "$cpus" "$@"; }
has_gpu() { "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; }
json_lines() { grep --line-buffered '^{"name' | tee "$OUT/$1.json"; }
show_profile() {
  "$PY" -c 'import json, sys
d = json.load(open(sys.argv[1]))
print({k: v for k, v in d.items() if not k.startswith("top")})
for key in ("top", "top_cpu"):
    for t in d.get(key, [])[:12]: print(key, t)' "$OUT/$1.json" || tail -n 5 "$OUT/$1.log"
}
RANDOM_SMOLLM2=(--random-weights smollm2-135m --tokenizer "$TOK")
RANDOM_1B=(--random-weights llama-1b --tokenizer "$TOK")

for part in $PARTS; do
  echo "== $part"
  case $part in
    gpu_train) has_gpu && timeout 200 "$PY" -m benchmarks.train "${RANDOM_1B[@]}" \
      --steps "$GPU_STEPS" 2>"$OUT/$part.log" | json_lines "$part" ;;
    gpu_profile) has_gpu && { timeout 150 "$PY" -m benchmarks.profile_train "${RANDOM_1B[@]}" \
      --steps 8 >"$OUT/$part.json" 2>"$OUT/$part.log"; show_profile "$part"; } ;;
    attention) on_two_cores timeout 60 "$PY" -m benchmarks.attention 2>"$OUT/$part.log" \
      | json_lines "$part" ;;
    cpu_profile) on_two_cores timeout 100 "$PY" -m benchmarks.profile_train \
      "${RANDOM_SMOLLM2[@]}" --steps 5 >"$OUT/$part.json" 2>"$OUT/$part.log" ;
      show_profile "$part" ;;
    cpu_train) on_two_cores timeout $((300 * CPU_ROUNDS)) "$PY" -m benchmarks.train \
      "${RANDOM_SMOLLM2[@]}" --steps "$CPU_STEPS" --rounds "$CPU_ROUNDS" 2>"$OUT/$part.log" \
      | json_lines "$part" ;;
    *) echo "unknown part $part" ;;
  esac
done
