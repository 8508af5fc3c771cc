// AArch64 Advanced SIMD build of the kernels; NEON is baseline on aarch64, so no extra flag is needed.
#define GROUPNORM_ISA neon
#include "groupnorm/vec/neon.h"
#include "../forward_impl.h"
#include "../backward_impl.h"

namespace groupnorm {
namespace neon {
GROUPNORM_DEFINE_KERNEL_TABLE(VecF32, VecF64)
}  // namespace neon
}  // namespace groupnorm
