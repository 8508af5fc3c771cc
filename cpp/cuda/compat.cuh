// compat.cuh: what the kernels (kernels.cuh) and their launchers (groupnorm_cuda_impl.cuh) use of CUDA, in one
// place, so that the same sources compile twice: by nvcc for the GPU, and by a host C++ compiler with
// GN_CUDA_EMULATE defined, against tests/cuda_emu/cuda_emu.h, which runs each block's threads as fibers on the
// CPU (tests/cuda_emu/cuda_emu_check.cpp checks the kernels that way where there is no GPU).
//
// The kernels use only: threadIdx/blockIdx/blockDim/gridDim, __syncthreads(), dynamic shared memory
// (gn_shared_memory()), plain loads and stores, and the conversions below. No warp intrinsics, atomics or
// cooperative groups: every reduction is a fixed tree over shared memory, so results are the same bits run to run.
#ifndef GROUPNORM_CUDA_COMPAT_CUH_
#define GROUPNORM_CUDA_COMPAT_CUH_

#include <cstddef>
#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define GN_GLOBAL __global__
#define GN_DEVICE __device__ __forceinline__

using gn_half = __half;
using gn_bf16 = __nv_bfloat16;
using gn_stream_t = cudaStream_t;

GN_DEVICE unsigned char* gn_shared_memory() {
  extern __shared__ __align__(16) unsigned char gn_dynamic_shared[];
  return gn_dynamic_shared;
}
GN_DEVICE float gn_widen(gn_half h) { return __half2float(h); }
GN_DEVICE float gn_widen(gn_bf16 h) { return __bfloat162float(h); }
GN_DEVICE void gn_store(gn_half* p, float v) { *p = __float2half_rn(v); }  // round to nearest even
GN_DEVICE void gn_store(gn_bf16* p, float v) { *p = __float2bfloat16_rn(v); }

// Launches kernel<<<grid, block, shared, stream>>>(args...); returns the launch's error (0 when it started).
template <class... P, class... A>
inline int gn_launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t shared, gn_stream_t stream, A... args) {
  kernel<<<grid, block, shared, stream>>>(static_cast<P>(args)...);
  return static_cast<int>(cudaGetLastError());
}

#elif defined(GN_CUDA_EMULATE)
#include "cuda_emu.h"  // tests/cuda_emu: dim3, threadIdx..., __syncthreads, gn_emu::launch, gn_emu::shared_memory
#include "groupnorm/half.h"

#define GN_GLOBAL
#define GN_DEVICE inline

using gn_half = groupnorm::Half;
using gn_bf16 = groupnorm::BFloat16;
using gn_stream_t = void*;

inline unsigned char* gn_shared_memory() { return gn_emu::shared_memory(); }
inline float gn_widen(gn_half h) { return groupnorm::widen(h); }
inline float gn_widen(gn_bf16 h) { return groupnorm::widen(h); }
inline void gn_store(gn_half* p, float v) { *p = groupnorm::narrow_half(v); }
inline void gn_store(gn_bf16* p, float v) { *p = groupnorm::narrow_bfloat16(v); }

template <class... P, class... A>
inline int gn_launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t shared, gn_stream_t, A... args) {
  return gn_emu::launch(kernel, grid, block, shared, static_cast<P>(args)...);
}

#else
#error "compat.cuh: compile with nvcc, or define GN_CUDA_EMULATE and put tests/cuda_emu on the include path"
#endif

// Storage <-> compute conversions shared by both builds.
GN_DEVICE float gn_widen(float v) { return v; }
GN_DEVICE double gn_widen(double v) { return v; }
GN_DEVICE void gn_store(float* p, float v) { *p = v; }
GN_DEVICE void gn_store(double* p, double v) { *p = v; }

#endif  // GROUPNORM_CUDA_COMPAT_CUH_
