#!/usr/bin/env bash
# The GPU checks in one run, for a lent GPU machine with PyTorch preinstalled:
# the job's CUDA tests (one and two ranks), the ResNet-18 throughput benchmark,
# then the data-parallel benchmark: 1 and 2 ranks (NCCL with two GPUs; on one
# GPU both ranks share it over gloo), and torch.compile on the launch-bound
# digits MLP. Results and logs go to $OUT (or ./gpu-out). Missing pure-Python
# packages may be passed as wheels in .whl/ (installed to /tmp/site, nothing
# else is touched). TESTS_ONLY=1 stops after the tests; DP_ONLY=1 runs only
# the data-parallel benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-out}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/job_image:$PWD" PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$out/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))' | tee -a "$out/gpu.txt"
if [ "${DP_ONLY:-0}" != 1 ]; then
  python3 -m pytest --noconftest -q -p no:cacheprovider -m gpu tests/job/test_gpu.py 2>&1 | tee "$out/gpu-tests.txt"
  [ "${TESTS_ONLY:-0}" = 1 ] && exit 0
  python3 -m bench.gpu_throughput --out "$out/gpu-throughput.json" --budget-s "${BUDGET_S:-300}" 2>&1 | tee "$out/gpu-throughput.txt"
fi
[ "${TESTS_ONLY:-0}" = 1 ] && exit 0
dp="$out/data-parallel.json"
{
  python3 -m bench data-parallel --device cuda --world 1 2 --model resnet18 --epochs 2 --out "$dp"
  python3 -m bench data-parallel --device cuda --world 1 2 --model digits-mlp --epochs 2 --out "$dp"
  python3 -m bench data-parallel --device cuda --world 1 --model digits-mlp --epochs 2 --compile default --out "$dp"
  python3 -m bench data-parallel --device cuda --world 1 --model digits-mlp --epochs 2 --compile reduce-overhead --out "$dp"
} 2>&1 | tee "$out/data-parallel.txt"
