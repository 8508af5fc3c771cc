#!/usr/bin/env bash
# run.sh — builds the C++ core and tests/cpp/kernel_check.cpp with g++ into a temporary directory and runs it.
# Each ISA translation unit gets only its own flags; dispatch.cpp learns which tables exist from -D defines.
# Usage: tests/cpp/run.sh [kernel_check args, e.g. --seed=N]   (CXX overrides the compiler)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cxx="${CXX:-g++}"
build="$(mktemp -d "${TMPDIR:-/tmp}/groupnorm-kernel-check.XXXXXX")"
trap 'rm -rf "$build"' EXIT

common=(-std=c++17 -O2 -fopenmp -ffp-contract=off -I"$root/cpp/include" -I"$root/cpp/kernels" -I"$root/cpp")
compile() {  # compile <source> <object> [flags...]
  local src="$1" obj="$2"
  shift 2
  "$cxx" "${common[@]}" "$@" -c "$root/$src" -o "$build/$obj"
}

case "$(uname -m)" in
  x86_64 | amd64)
    compile cpp/kernels/isa/avx2.cpp avx2.o -mavx2 -mfma -mf16c &
    compile cpp/kernels/isa/avx512.cpp avx512.o -mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx2 -mfma -mf16c &
    isa_objects=(avx2.o avx512.o)
    dispatch_defines=(-DGROUPNORM_HAVE_AVX2 -DGROUPNORM_HAVE_AVX512)
    ;;
  aarch64 | arm64)
    compile cpp/kernels/isa/neon.cpp neon.o &
    isa_objects=(neon.o)
    dispatch_defines=(-DGROUPNORM_HAVE_NEON)
    ;;
  *)
    isa_objects=()
    dispatch_defines=()
    ;;
esac
compile cpp/kernels/isa/scalar.cpp scalar.o &
compile cpp/dispatch.cpp dispatch.o "${dispatch_defines[@]}" &
compile tests/cpp/kernel_check.cpp kernel_check.o &
failed=0
for job in $(jobs -p); do wait "$job" || failed=1; done
if [ "$failed" -ne 0 ]; then
  echo "run.sh: compilation failed" >&2
  exit 1
fi

objects=()
for obj in scalar.o "${isa_objects[@]}" dispatch.o kernel_check.o; do objects+=("$build/$obj"); done
"$cxx" -fopenmp "${objects[@]}" -o "$build/kernel_check"
"$build/kernel_check" "$@"
