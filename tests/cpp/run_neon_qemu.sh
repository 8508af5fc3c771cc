#!/usr/bin/env bash
# run_neon_qemu.sh — cross-builds tests/cpp/kernel_check for aarch64 through CMake (the same target and flags as
# the native check: scalar + NEON levels) and runs it under qemu-aarch64, so the NEON kernels are exercised on an
# x86-64 host. Skips (exit 0) when cmake, the cross compiler or qemu is missing. Args go to kernel_check.
# Setup on Debian/Ubuntu: apt-get install g++-aarch64-linux-gnu qemu-user (or qemu-user-static).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cxx="${AARCH64_CXX:-aarch64-linux-gnu-g++}"
sysroot="${AARCH64_SYSROOT:-/usr/aarch64-linux-gnu}"
qemu=""
for candidate in qemu-aarch64 qemu-aarch64-static; do
  if command -v "$candidate" >/dev/null 2>&1; then
    qemu="$candidate"
    break
  fi
done
for tool in cmake "$cxx" "$qemu"; do
  if [ -z "$tool" ] || ! command -v "$tool" >/dev/null 2>&1; then
    echo "run_neon_qemu.sh: SKIP: missing ${tool:-qemu-aarch64} (needs cmake, $cxx and qemu-aarch64)"
    exit 0
  fi
done

build="$(mktemp -d "${TMPDIR:-/tmp}/groupnorm-neon-check.XXXXXX")"
trap 'rm -rf "$build"' EXIT
cmake -S "$root" -B "$build" -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 \
  -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_BUILD_TYPE=Release -DGROUPNORM_BUILD_TESTS=ON >"$build/configure.log" ||
  { cat "$build/configure.log" >&2; exit 1; }
cmake --build "$build" --target groupnorm_kernel_check -j 2 >"$build/build.log" ||
  { cat "$build/build.log" >&2; exit 1; }

# Emulation is ~30x slower (long double is software quad on aarch64): --quick thins the sweep unless
# GROUPNORM_NEON_FULL=1. Two emulated threads still exercise the parallel paths.
quick=(--quick)
if [ "${GROUPNORM_NEON_FULL:-0}" = 1 ]; then quick=(); fi
OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" "$qemu" -L "$sysroot" "$build/groupnorm_kernel_check" "${quick[@]}" "$@"
