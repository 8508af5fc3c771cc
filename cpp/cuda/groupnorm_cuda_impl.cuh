// groupnorm_cuda_impl.cuh: the host side of the CUDA kernels: checks, the split of each shape (plan), the
// workspace's layout, the launches, and the C functions of groupnorm_cuda.h. Included once, by groupnorm_cuda.cu
// (nvcc) or by tests/cuda_emu/cuda_emu_check.cpp (the CPU emulation).
#ifndef GROUPNORM_CUDA_IMPL_CUH_
#define GROUPNORM_CUDA_IMPL_CUH_

#include "groupnorm_cuda.h"
#include "kernels.cuh"

namespace gn_cuda {

constexpr int64_t kTargetBlocks = 1024;  // blocks a reducing kernel aims for: about 8 per SM of an H100
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMergeAbove = 32;      // more chunks than this per (n, c): columns_merge_* fold them first
constexpr int64_t kMinRowsLast = 64;     // channels last: at least this many rows a chunk (partials stay < 1/32)
constexpr int64_t kMaxIndex = int64_t(1) << 62;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

inline size_t dtype_size(int dtype) {
  switch (dtype) {
    case GN_CUDA_FLOAT32: return 4;
    case GN_CUDA_FLOAT64: return 8;
    case GN_CUDA_FLOAT16:
    case GN_CUDA_BFLOAT16: return 2;
    default: return 0;
  }
}

inline bool valid(const gn_cuda_problem* p) {
  if (p == nullptr || p->n < 1 || p->c < 1 || p->s < 1 || p->groups < 1 || p->c % p->groups != 0) return false;
  if (dtype_size(p->dtype) == 0 || dtype_size(p->param_dtype) == 0) return false;
  const bool half = p->dtype == GN_CUDA_FLOAT16 || p->dtype == GN_CUDA_BFLOAT16;
  if (p->param_dtype != p->dtype && !(half && p->param_dtype == GN_CUDA_FLOAT32)) return false;
  if (p->channels_last != 0 && p->channels_last != 1) return false;
  if (p->silu != 0 && p->silu != 1) return false;
  if (!(p->eps >= 0.0 && p->eps <= 1.7976931348623157e308)) return false;  // refuses NaN and inf
  if (p->n > kMaxIndex / p->c || p->n * p->c > (int64_t(1) << 31) - 1) return false;  // grid.x holds N*C
  if (p->s > (kMaxIndex - 1) / (p->n * p->c)) return false;  // n*c*s < 2^62
  return true;
}

// The widest vector (16 bytes) for storage of `size` bytes.
inline int vector_width(size_t size) { return static_cast<int>(16 / size); }

inline int pow2_at_least(int64_t w, int cap) {
  int p = 1;
  while (p < w && p < cap) p *= 2;
  return p;
}

// The split of a shape for vectors of v elements (1, or vector_width where the data allow).
inline Geometry plan(const gn_cuda_problem& p, int v) {
  Geometry g{};
  g.n = p.n;
  g.c = p.c;
  g.s = p.s;
  g.groups = p.groups;
  g.d = p.c / p.groups;
  g.silu = p.silu;
  g.width = (p.channels_last ? p.c : p.s) / v;
  g.rows = p.channels_last ? p.s : p.n * p.c;
  g.tc = pow2_at_least(g.width, kThreads);
  g.tr = kThreads / g.tc;
  if (!p.channels_last) {
    // Chunks along each row: enough blocks in all, yet at least 8 vectors a thread.
    const int64_t row_blocks = ceil_div(g.rows, g.tr);
    const int64_t k_max = max64(1, ceil_div(g.width, int64_t(g.tc) * 8));
    const int64_t k = min64(k_max, max64(1, ceil_div(kTargetBlocks, row_blocks)));
    g.chunk = max64(ceil_div(g.width, k), ceil_div(g.width, kMaxGridY));
    g.k = ceil_div(g.width, g.chunk);
  } else {
    // Chunks of rows within each sample: enough blocks over all samples, yet at least kMinRowsLast rows (and 8 a
    // thread) per chunk.
    const int64_t sample_blocks = min64(g.n, kMaxGridY);
    const int64_t k_target = max64(1, ceil_div(kTargetBlocks, sample_blocks));
    const int64_t at_least = max64(kMinRowsLast, int64_t(g.tr) * 8);
    g.chunk = min64(g.s, max64(at_least, ceil_div(g.s, k_target)));
    g.k = ceil_div(g.s, g.chunk);
  }
  return g;
}

// The workspace, in compute-type elements, each array 16-byte aligned.
struct Carver {
  unsigned char* base;
  size_t used = 0;
  template <class A> A* take(int64_t count) {
    A* at = base ? reinterpret_cast<A*>(base + used) : nullptr;
    used += (static_cast<size_t>(count) * sizeof(A) + 15) / 16 * 16;
    return at;
  }
};

struct ForwardSpace {
  template <class A> static void carve(Carver& w, const Geometry& g, A** parts, A** merged, A** coef, A** stats) {
    const int64_t nc = g.n * g.c;
    for (int i = 0; i < 3; ++i) parts[i] = w.take<A>(g.k * nc);  // pivot, offset, M2
    for (int i = 0; i < 3; ++i) merged[i] = g.k > kMergeAbove ? w.take<A>(nc) : nullptr;
    for (int i = 0; i < 4; ++i) coef[i] = w.take<A>(nc);  // scale, shift, pivot, offset
    stats[0] = w.take<A>(g.n * g.groups);
    stats[1] = w.take<A>(g.n * g.groups);
  }
};

struct BackwardSpace {
  template <class A>
  static void carve(Carver& w, const Geometry& g, A** parts, A** merged, A** sums, A** coef, A** fcoef) {
    const int64_t nc = g.n * g.c;
    fcoef[0] = w.take<A>(nc);
    fcoef[1] = w.take<A>(nc);
    parts[0] = w.take<A>(g.k * nc);
    parts[1] = w.take<A>(g.k * nc);
    merged[0] = g.k > kMergeAbove ? w.take<A>(nc) : nullptr;
    merged[1] = g.k > kMergeAbove ? w.take<A>(nc) : nullptr;
    sums[0] = w.take<A>(nc);
    sums[1] = w.take<A>(nc);
    for (int i = 0; i < 4; ++i) coef[i] = w.take<A>(nc);
  }
};

template <class A> size_t compute_type_workspace(const gn_cuda_problem& p, bool forward) {
  size_t most = 0;
  for (int v : {1, vector_width(dtype_size(p.dtype))}) {  // the bytes of the larger split of those that can run
    if ((p.channels_last ? p.c : p.s) % v != 0) continue;  // a row shorter than a vector has no split for it
    const Geometry g = plan(p, v);
    Carver w{nullptr};
    A* a[4];  // the arrays' addresses, unused: only the bytes they take count here
    A* b[4];
    A* c[4];
    A* d[4];
    A* e[4];
    if (forward) ForwardSpace::carve<A>(w, g, a, b, c, d);
    else BackwardSpace::carve<A>(w, g, a, b, c, d, e);
    most = w.used > most ? w.used : most;
  }
  return most;
}

inline size_t workspace_bytes(const gn_cuda_problem* p, bool forward) {
  if (!valid(p)) return 0;
  return p->dtype == GN_CUDA_FLOAT64 ? compute_type_workspace<double>(*p, forward)
                                     : compute_type_workspace<float>(*p, forward);
}

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// 16-byte vectors when the row length allows and every data pointer is aligned for them; else single elements.
template <class S> int usable_width(const gn_cuda_problem& p, const void* a, const void* b, const void* c) {
  const int v = vector_width(sizeof(S));
  const int64_t length = p.channels_last ? p.c : p.s;
  const bool ok = length % v == 0 && aligned16(a) && aligned16(b) && (c == nullptr || aligned16(c));
  return ok ? v : 1;
}

// The grids of the kernels that read the data (partials and apply).
inline dim3 data_grid(const Geometry& g, bool channels_last) {
  if (channels_last) return dim3(static_cast<unsigned>(g.k), static_cast<unsigned>(min64(g.n, kMaxGridY)));
  return dim3(static_cast<unsigned>(ceil_div(g.rows, g.tr)), static_cast<unsigned>(g.k));
}

template <class S, int V, class P>
int forward_launch(const gn_cuda_problem& p, const Geometry& g, const S* x, const P* weight, const P* bias, S* y,
                   typename Compute<S>::type* mean, typename Compute<S>::type* rstd, void* workspace,
                   gn_stream_t stream) {
  using A = typename Compute<S>::type;
  Carver w{static_cast<unsigned char*>(workspace)};
  A *parts[3], *merged[3], *coef[4], *stats[2];
  ForwardSpace::carve<A>(w, g, parts, merged, coef, stats);
  const bool last = p.channels_last != 0;
  const dim3 grid = data_grid(g, last), block(kThreads);
  int err = last ? gn_launch(forward_partials_last<S, V>, grid, block, 4 * kThreads * V * sizeof(A), stream, x, g,
                             parts[0], parts[1], parts[2])
                 : gn_launch(forward_partials_first<S, V>, grid, block, 4 * kThreads * sizeof(A), stream, x, g,
                             parts[0], parts[1], parts[2]);
  if (err) return err;
  A** moments = parts;
  int64_t kc = g.k;
  if (g.k > kMergeAbove) {
    err = gn_launch(columns_merge_moments<A>, dim3(static_cast<unsigned>(ceil_div(g.n * g.c, 32))), block,
                    4 * kThreads * sizeof(A), stream, parts[0], parts[1], parts[2], g, V, p.channels_last, merged[0],
                    merged[1], merged[2]);
    if (err) return err;
    moments = merged;
    kc = 1;
  }
  err = gn_launch(forward_finalize<A, P>, dim3(static_cast<unsigned>(g.n * g.groups)), block,
                  4 * kThreads * sizeof(A), stream, moments[0], moments[1], moments[2], kc, g, V, p.channels_last,
                  static_cast<A>(p.eps), weight, bias, mean ? mean : stats[0], rstd ? rstd : stats[1], coef[0],
                  coef[1], coef[2], coef[3]);
  if (err) return err;
  return last ? gn_launch(forward_apply_last<S, V>, grid, block, 0, stream, x, g, coef[0], coef[1], coef[2], coef[3],
                          y)
              : gn_launch(forward_apply_first<S, V>, grid, block, 0, stream, x, g, coef[0], coef[1], coef[2],
                          coef[3], y);
}

template <class S, int V, class P>
int backward_launch(const gn_cuda_problem& p, const Geometry& g, const S* dz, const S* x,
                    const typename Compute<S>::type* mean, const typename Compute<S>::type* rstd, const P* weight,
                    const P* bias, S* dx, typename Compute<S>::type* grad_weight,
                    typename Compute<S>::type* grad_bias, void* workspace, gn_stream_t stream) {
  using A = typename Compute<S>::type;
  Carver w{static_cast<unsigned char*>(workspace)};
  A *parts[2], *merged[2], *sums[2], *coef[4], *fcoef[2];
  BackwardSpace::carve<A>(w, g, parts, merged, sums, coef, fcoef);
  const bool last = p.channels_last != 0;
  const dim3 grid = data_grid(g, last), block(kThreads);
  const unsigned nc_blocks = static_cast<unsigned>(ceil_div(g.n * g.c, kThreads));
  int err = 0;
  if (g.silu) {
    err = gn_launch(forward_coefficients<A, P>, dim3(nc_blocks), block, 0, stream, rstd, g, weight, bias, fcoef[0],
                    fcoef[1]);
    if (err) return err;
  }
  err = last ? gn_launch(backward_partials_last<S, V>, grid, block, 2 * kThreads * V * sizeof(A), stream, dz, x, g,
                         mean, fcoef[0], fcoef[1], parts[0], parts[1])
             : gn_launch(backward_partials_first<S, V>, grid, block, 2 * kThreads * sizeof(A), stream, dz, x, g,
                         mean, fcoef[0], fcoef[1], parts[0], parts[1]);
  if (err) return err;
  const A* part_dy = parts[0];
  const A* part_dyx = parts[1];
  int64_t kc = g.k;
  if (g.k > kMergeAbove) {
    err = gn_launch(columns_merge_sums<A>, dim3(static_cast<unsigned>(ceil_div(g.n * g.c, 32))), block,
                    2 * kThreads * sizeof(A), stream, parts[0], parts[1], g, merged[0], merged[1]);
    if (err) return err;
    part_dy = merged[0];
    part_dyx = merged[1];
    kc = 1;
  }
  err = gn_launch(backward_finalize<A, P>, dim3(static_cast<unsigned>(g.n * g.groups)), block,
                  2 * kThreads * sizeof(A), stream, part_dy, part_dyx, kc, g, mean, rstd, weight, sums[0], sums[1],
                  coef[0], coef[1], coef[2], coef[3]);
  if (err) return err;
  if (grad_weight || grad_bias) {
    err = gn_launch(backward_params<A>, dim3(static_cast<unsigned>(ceil_div(g.c, 32))), block,
                    2 * kThreads * sizeof(A), stream, sums[0], sums[1], rstd, g, grad_weight, grad_bias);
    if (err) return err;
  }
  return last ? gn_launch(backward_apply_last<S, V>, grid, block, 0, stream, dz, x, g, coef[0], coef[1], coef[2],
                          coef[3], fcoef[0], fcoef[1], dx)
              : gn_launch(backward_apply_first<S, V>, grid, block, 0, stream, dz, x, g, coef[0], coef[1], coef[2],
                          coef[3], fcoef[0], fcoef[1], dx);
}

// The storage type S and, for 16-bit data, the parameters' type P (S or float).
template <class S, class P>
int forward_typed(const gn_cuda_problem& p, const void* x, const void* weight, const void* bias, void* y, void* mean,
                  void* rstd, void* workspace, gn_stream_t stream) {
  using A = typename Compute<S>::type;
  const S* xs = static_cast<const S*>(x);
  S* ys = static_cast<S*>(y);
  const P* w = static_cast<const P*>(weight);
  const P* b = static_cast<const P*>(bias);
  A* m = static_cast<A*>(mean);
  A* r = static_cast<A*>(rstd);
  constexpr int kV = 16 / sizeof(S);
  if (usable_width<S>(p, x, y, nullptr) == kV)
    return forward_launch<S, kV, P>(p, plan(p, kV), xs, w, b, ys, m, r, workspace, stream);
  return forward_launch<S, 1, P>(p, plan(p, 1), xs, w, b, ys, m, r, workspace, stream);
}

template <class S, class P>
int backward_typed(const gn_cuda_problem& p, const void* dz, const void* x, const void* mean, const void* rstd,
                   const void* weight, const void* bias, void* dx, void* grad_weight, void* grad_bias,
                   void* workspace, gn_stream_t stream) {
  using A = typename Compute<S>::type;
  const S* dzs = static_cast<const S*>(dz);
  const S* xs = static_cast<const S*>(x);
  S* dxs = static_cast<S*>(dx);
  const A* m = static_cast<const A*>(mean);
  const A* r = static_cast<const A*>(rstd);
  const P* w = static_cast<const P*>(weight);
  const P* b = static_cast<const P*>(bias);
  A* gw = static_cast<A*>(grad_weight);
  A* gb = static_cast<A*>(grad_bias);
  constexpr int kV = 16 / sizeof(S);
  if (usable_width<S>(p, dz, x, dx) == kV)
    return backward_launch<S, kV, P>(p, plan(p, kV), dzs, xs, m, r, w, b, dxs, gw, gb, workspace, stream);
  return backward_launch<S, 1, P>(p, plan(p, 1), dzs, xs, m, r, w, b, dxs, gw, gb, workspace, stream);
}

}  // namespace gn_cuda

extern "C" {

int gn_cuda_problem_valid(const gn_cuda_problem* p) { return gn_cuda::valid(p) ? 1 : 0; }

size_t gn_cuda_forward_workspace(const gn_cuda_problem* p) { return gn_cuda::workspace_bytes(p, true); }

size_t gn_cuda_backward_workspace(const gn_cuda_problem* p) { return gn_cuda::workspace_bytes(p, false); }

int gn_cuda_forward(const gn_cuda_problem* p, const void* x, const void* weight, const void* bias, void* y,
                    void* mean, void* rstd, void* workspace, void* stream) {
  using namespace gn_cuda;
  if (!valid(p) || x == nullptr || y == nullptr || workspace == nullptr || !aligned16(workspace))
    return GN_CUDA_BAD_PROBLEM;
  const gn_stream_t s = static_cast<gn_stream_t>(stream);
  const bool f32_params = p->param_dtype == GN_CUDA_FLOAT32;
  switch (p->dtype) {
    case GN_CUDA_FLOAT32: return forward_typed<float, float>(*p, x, weight, bias, y, mean, rstd, workspace, s);
    case GN_CUDA_FLOAT64: return forward_typed<double, double>(*p, x, weight, bias, y, mean, rstd, workspace, s);
    case GN_CUDA_FLOAT16:
      return f32_params ? forward_typed<gn_half, float>(*p, x, weight, bias, y, mean, rstd, workspace, s)
                        : forward_typed<gn_half, gn_half>(*p, x, weight, bias, y, mean, rstd, workspace, s);
    default:
      return f32_params ? forward_typed<gn_bf16, float>(*p, x, weight, bias, y, mean, rstd, workspace, s)
                        : forward_typed<gn_bf16, gn_bf16>(*p, x, weight, bias, y, mean, rstd, workspace, s);
  }
}

int gn_cuda_backward(const gn_cuda_problem* p, const void* dy, const void* x, const void* mean, const void* rstd,
                     const void* weight, const void* bias, void* dx, void* grad_weight, void* grad_bias,
                     void* workspace, void* stream) {
  using namespace gn_cuda;
  if (!valid(p) || dy == nullptr || x == nullptr || mean == nullptr || rstd == nullptr || dx == nullptr ||
      workspace == nullptr || !aligned16(workspace))
    return GN_CUDA_BAD_PROBLEM;
  const gn_stream_t s = static_cast<gn_stream_t>(stream);
  const bool f32_params = p->param_dtype == GN_CUDA_FLOAT32;
#define GN_BACKWARD(S, P) backward_typed<S, P>(*p, dy, x, mean, rstd, weight, bias, dx, grad_weight, grad_bias, \
                                               workspace, s)
  switch (p->dtype) {
    case GN_CUDA_FLOAT32: return GN_BACKWARD(float, float);
    case GN_CUDA_FLOAT64: return GN_BACKWARD(double, double);
    case GN_CUDA_FLOAT16: return f32_params ? GN_BACKWARD(gn_half, float) : GN_BACKWARD(gn_half, gn_half);
    default: return f32_params ? GN_BACKWARD(gn_bf16, float) : GN_BACKWARD(gn_bf16, gn_bf16);
  }
#undef GN_BACKWARD
}

}  // extern "C"

#endif  // GROUPNORM_CUDA_IMPL_CUH_
