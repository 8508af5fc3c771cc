#!/usr/bin/env bash
# run_neon_qemu.sh — cross-compiles the C++ core (scalar + NEON levels) and tests/cpp/kernel_check.cpp for aarch64,
# links statically (libgomp included) and runs the check under qemu-aarch64, so the NEON kernels are exercised on
# an x86-64 host. Skips (exit 0) when the cross compiler or qemu is missing. Args go to kernel_check (e.g. --seed=N).
# Setup on Debian/Ubuntu: apt-get install g++-aarch64-linux-gnu qemu-user (or qemu-user-static).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cxx="${AARCH64_CXX:-aarch64-linux-gnu-g++}"
qemu=""
for candidate in qemu-aarch64 qemu-aarch64-static; do
  if command -v "$candidate" >/dev/null 2>&1; then
    qemu="$candidate"
    break
  fi
done
if ! command -v "$cxx" >/dev/null 2>&1; then
  echo "run_neon_qemu.sh: SKIP: no aarch64 cross compiler ($cxx)"
  exit 0
fi
if [ -z "$qemu" ]; then
  echo "run_neon_qemu.sh: SKIP: neither qemu-aarch64 nor qemu-aarch64-static is installed"
  exit 0
fi

build="$(mktemp -d "${TMPDIR:-/tmp}/groupnorm-neon-check.XXXXXX")"
trap 'rm -rf "$build"' EXIT

common=(-std=c++17 -O2 -fopenmp -ffp-contract=off -I"$root/cpp/include" -I"$root/cpp/kernels" -I"$root/cpp")
compile() {  # compile <source> <object> [flags...]
  local src="$1" obj="$2"
  shift 2
  "$cxx" "${common[@]}" "$@" -c "$root/$src" -o "$build/$obj"
}
compile cpp/kernels/isa/scalar.cpp scalar.o &
compile cpp/kernels/isa/neon.cpp neon.o &
compile cpp/dispatch.cpp dispatch.o -DGROUPNORM_HAVE_NEON &
compile tests/cpp/kernel_check.cpp kernel_check.o &
failed=0
for job in $(jobs -p); do wait "$job" || failed=1; done
if [ "$failed" -ne 0 ]; then
  echo "run_neon_qemu.sh: cross compilation failed" >&2
  exit 1
fi
# Static libgomp warns about dlopen (OpenACC profiling, never used here); show the link log only on failure.
if ! "$cxx" -static -fopenmp "$build/scalar.o" "$build/neon.o" "$build/dispatch.o" "$build/kernel_check.o" \
  -o "$build/kernel_check" >"$build/link.log" 2>&1; then
  cat "$build/link.log" >&2
  exit 1
fi

# Emulation is ~30x slower (long double is software quad on aarch64): --quick thins the sweep unless
# GROUPNORM_NEON_FULL=1. Two emulated threads still exercise the parallel paths.
quick=(--quick)
if [ "${GROUPNORM_NEON_FULL:-0}" = 1 ]; then quick=(); fi
OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" "$qemu" "$build/kernel_check" "${quick[@]}" "$@"
