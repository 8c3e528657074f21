#!/usr/bin/env bash
# Compile-checks csrc/minicirc_cuda.cu with nvcc (no GPU, no link), with the flags torch's
# BuildExtension uses for the stable-ABI CUDA library: -std=c++20 as torch 2.13 passes it, and
# -DUSE_CUDA, without which the stable ABI's aoti_torch_get_current_cuda_stream is not declared.
#   scripts/check_cuda_compile.sh            # sm_80 and sm_90
#   ARCHS="75 89 120" scripts/check_cuda_compile.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3)}
NVCC=${NVCC:-nvcc}
command -v "$NVCC" >/dev/null || { echo "nvcc not found; set NVCC" >&2; exit 2; }
T=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))')
OUT=${OUT_DIR:-$(mktemp -d)}
GENCODE=()
for a in ${ARCHS:-80 90}; do GENCODE+=("-gencode=arch=compute_${a},code=sm_${a}"); done
set -x
"$NVCC" -std=c++20 -c csrc/minicirc_cuda.cu -o "$OUT/minicirc_cuda.o" -I"$T" "${GENCODE[@]}" -O3 \
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
  -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr \
  -DTORCH_TARGET_VERSION=0x020a000000000000 -DUSE_CUDA -Xcompiler -fPIC \
  --Werror cross-execution-space-call -Xptxas -warn-spills
set +x
echo "OK: $OUT/minicirc_cuda.o"
