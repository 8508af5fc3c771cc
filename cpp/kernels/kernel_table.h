// kernel_table.h — the function table each ISA translation unit exports, and the ISA getters dispatch.cpp calls.
// Only plain pointers and the Problem descriptor cross it, so no ISA-specific type leaks out of an ISA TU.
#pragma once

#include "groupnorm/groupnorm.h"
#include "groupnorm/half.h"

namespace groupnorm {

struct KernelTable {
  Status (*forward_f32)(const Problem&, const float* x, const float* weight, const float* bias, float* y,
                        float* mean_out, float* rstd_out);
  Status (*forward_f64)(const Problem&, const double* x, const double* weight, const double* bias,
                        double* y, double* mean_out, double* rstd_out);
  // 16-bit storage: parameters, statistics and parameter gradients in float.
  Status (*forward_f16)(const Problem&, const Half* x, const float* weight, const float* bias, Half* y,
                        float* mean_out, float* rstd_out);
  Status (*forward_bf16)(const Problem&, const BFloat16* x, const float* weight, const float* bias, BFloat16* y,
                         float* mean_out, float* rstd_out);
  Status (*backward_f32)(const Problem&, const float* dy, const float* x, const float* mean, const float* rstd,
                         const float* weight, const float* bias, float* dx, float* dweight, float* dbias);
  Status (*backward_f64)(const Problem&, const double* dy, const double* x, const double* mean,
                         const double* rstd, const double* weight, const double* bias, double* dx, double* dweight,
                         double* dbias);
  Status (*backward_f16)(const Problem&, const Half* dy, const Half* x, const float* mean, const float* rstd,
                         const float* weight, const float* bias, Half* dx, float* dweight, float* dbias);
  Status (*backward_bf16)(const Problem&, const BFloat16* dy, const BFloat16* x, const float* mean,
                          const float* rstd, const float* weight, const float* bias, BFloat16* dx, float* dweight,
                          float* dbias);
};

// Bytes of the last-level cache one core reaches (dispatch.cpp; 32 MiB where the system does not say): the
// forward's default stream threshold, and the backward's test of whether its passes share cached data.
int64_t last_level_cache_bytes();

namespace scalar { const KernelTable* kernel_table(); }
namespace avx2 { const KernelTable* kernel_table(); }
namespace avx512 { const KernelTable* kernel_table(); }
namespace avx512_bf16 { const KernelTable* kernel_table(); }
namespace neon { const KernelTable* kernel_table(); }

}  // namespace groupnorm

// Defines GROUPNORM_ISA::kernel_table() from the templates of forward_impl.h and backward_impl.h; used once
// per ISA TU, inside namespace groupnorm::GROUPNORM_ISA.
#define GROUPNORM_DEFINE_KERNEL_TABLE(VecF32, VecF64)                                   \
  const KernelTable* kernel_table() {                                                   \
    static constexpr KernelTable table = {&group_norm_forward_impl<VecF32, float>,      \
                                          &group_norm_forward_impl<VecF64, double>,     \
                                          &group_norm_forward_impl<VecF32, Half>,       \
                                          &group_norm_forward_impl<VecF32, BFloat16>,   \
                                          &group_norm_backward_impl<VecF32, float>,     \
                                          &group_norm_backward_impl<VecF64, double>,    \
                                          &group_norm_backward_impl<VecF32, Half>,      \
                                          &group_norm_backward_impl<VecF32, BFloat16>}; \
    return &table;                                                                      \
  }

// Defines GROUPNORM_ISA::kernel_table() with the bfloat16 kernels alone, the other entries null: for a level
// that differs from another only in its bfloat16 narrowing (avx512_bf16 over avx512), whose float32, float64
// and float16 code would be the same instructions compiled a second time. dispatch.cpp fills the null entries
// from that other level. The table is a constant: no instruction of this TU runs until a kernel is called, so
// asking whether the level is compiled is safe on any CPU.
#define GROUPNORM_DEFINE_BF16_KERNEL_TABLE(VecF32)                                       \
  const KernelTable* kernel_table() {                                                   \
    static constexpr KernelTable table = {nullptr,                                      \
                                          nullptr,                                      \
                                          nullptr,                                      \
                                          &group_norm_forward_impl<VecF32, BFloat16>,   \
                                          nullptr,                                      \
                                          nullptr,                                      \
                                          nullptr,                                      \
                                          &group_norm_backward_impl<VecF32, BFloat16>}; \
    return &table;                                                                      \
  }
