// Scalar build of the kernels: one-lane Vec<T>, no ISA flags; runs on every CPU and is the reference level.
#define GROUPNORM_ISA scalar
#include "groupnorm/vec/scalar.h"
#include "../forward_impl.h"
#include "../backward_impl.h"

namespace groupnorm {
namespace scalar {
GROUPNORM_DEFINE_KERNEL_TABLE(VecF32, VecF64)
}  // namespace scalar
}  // namespace groupnorm
