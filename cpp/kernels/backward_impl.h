// backward_impl.h — GroupNorm backward (grad_input, grad_weight, grad_bias), written once against Vec<T> and
// compiled once per ISA. Pass 1 sums, per (n, c), dy, dy*(x - mean_hi) and (x - mean_hi) in short vector runs
// flushed to double; the last sum recovers the low part mean_lo that a float32 mean drops, so the centered
// sums stay accurate when |mean| >> std. Pass 2 writes dx = dy*(rstd*w) + (x - mean_hi)*c2 + (c3 - c2*mean_lo)
// in one fused sweep. Chunks, channels and samples merge in a fixed order: bitwise identical for every thread
// count, with no atomics. Included by cpp/kernels/isa/<isa>.cpp after forward_impl.h's shared helpers.
#pragma once

#include <cfloat>
#include <cmath>

#include "forward_impl.h"

namespace groupnorm {
namespace GROUPNORM_ISA {

// Per-(n, c) sums of pass 1, one array of N*C (or N*nchunks*C) doubles each.
struct GradSums {
  double* dy;     // sum dy
  double* dy_xc;  // sum dy * (x - mean_hi)
  double* xc;     // sum (x - mean_hi)
};

// Carves three arrays of `count` doubles out of one block of 3*count.
inline GradSums grad_sums_in(double* block, int64_t count) { return {block, block + count, block + 2 * count}; }

// What pass 2 and the parameter gradients need of one (n, group).
template <class T>
struct GroupGradCoeffs {
  T mean_hi;       // the mean as given, in T: pass 1 centers on it
  T c2;            // -ds * rstd^3 / M
  T shift;         // c3 - c2 * mean_lo, with c3 = -db * rstd / M
  double mean_lo;  // true group mean - mean_hi, from sum (x - mean_hi)
  double rstd;
  double ds_m, db_m;  // ds / M and db / M, for a wide group
  // c2 or shift lies past T's range (rare: rstd^3 overflows, rstd ~ 2^43 and up in float, with eps = 0 and a
  // group spread of ~1e-13) though dx itself need not: the group's dx is then computed in Wide<T>
  // (wide_grad_apply), where rstd^3 fits.
  bool wide;
};

inline double largest_finite(float) { return double(FLT_MAX); }
inline double largest_finite(double) { return DBL_MAX; }

// Group coefficients from the weighted sums ds = sum w*dy*(x - mean), db = sum w*dy over its M values.
template <class T>
GroupGradCoeffs<T> finish_grad_coeffs(T mean_hi, double mean_lo, double rstd, double ds, double db, double M) {
  const double c2 = -ds * rstd * rstd * rstd / M, c3 = -db * rstd / M, shift = c3 - c2 * mean_lo;
  const double largest = largest_finite(T(0));
  const bool wide = !(std::fabs(c2) <= largest) || !(std::fabs(shift) <= largest);
  return {mean_hi, wide ? T(0) : T(c2), wide ? T(0) : T(shift), mean_lo, rstd, ds / M, db / M, wide};
}

// dx of a wide group's `count` values `stride` apart (one channel's run, or a short group's L values), in
// Wide<T>: dy*(rstd*w) + ((x - mean_hi) - mean_lo)*c2 + c3. w: null (1), one weight (w_stride 0), or one a value.
template <class T, class S>
__attribute__((noinline)) void wide_grad_apply(const S* dy, const S* x, S* dx, int64_t count, int64_t stride,
                                               const T* w, int64_t w_stride, const GroupGradCoeffs<T>& k) {
  using Wd = Wide<T>;
  const Wd r = Wd(k.rstd), mean_hi = Wd(k.mean_hi), mean_lo = Wd(k.mean_lo);
  const Wd c2 = -Wd(k.ds_m) * r * r * r, c3 = -Wd(k.db_m) * r;
  for (int64_t i = 0; i < count; ++i) {
    const Wd scale = w ? r * Wd(w[i * w_stride]) : r;
    const Wd xc = (Wd(widen(x[i * stride])) - mean_hi) - mean_lo;
    put_wide(dx + i * stride, Wd(widen(dy[i * stride])) * scale + xc * c2 + c3);
  }
}

// The running sums of a run's pairs (dy, x - mean_hi), lane by lane: dy, dy*(x - mean_hi) and x - mean_hi.
template <class V>
struct GradLanes {
  V dy = V::zero(), dy_xc = V::zero(), xc = V::zero();
  void add(V g, V c) {
    dy = dy + g;
    dy_xc = fma(g, c, dy_xc);
    xc = xc + c;
  }
};

// run_grad_sums of a short run: two sets of accumulators (even and odd vectors, the tail in the odd set) that
// take turns, then one reduction across lanes each, in T. A channel of [32,512,7,7] (49 values) spent more on
// three reductions in double than on its four vectors.
template <class V, class S>
inline void run_grad_sums_short(const S* dy, const S* x, int64_t n, typename V::Scalar mean_hi, double* sum_dy,
                                double* sum_dy_xc, double* sum_xc) {
  using T = typename V::Scalar;
  constexpr int64_t W = V::kWidth;
  const V m = V::broadcast(mean_hi);
  GradLanes<V> a, b;
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    a.add(V::load(dy + i), V::load(x + i) - m);
    b.add(V::load(dy + i + W), V::load(x + i + W) - m);
  }
  if (i + W <= n) {
    a.add(V::load(dy + i), V::load(x + i) - m);
    i += W;
  }
  if (i < n)  // filled lanes give dy = 0 and x - mean_hi = 0
    b.add(V::load_tail(dy + i, n - i, T(0)), V::load_tail(x + i, n - i, mean_hi) - m);
  *sum_dy = double(V::sum_lanes(a.dy + b.dy));
  *sum_dy_xc = double(V::sum_lanes(a.dy_xc + b.dy_xc));
  *sum_xc = double(V::sum_lanes(a.xc + b.xc));
}

// Sums of a contiguous run of n >= 1 pairs (dy, x), centered on mean_hi, written to *sum_dy, *sum_dy_xc, *sum_xc.
template <class V, class S>
void run_grad_sums(const S* dy, const S* x, int64_t n, typename V::Scalar mean_hi, double* sum_dy,
                   double* sum_dy_xc, double* sum_xc) {
  using T = typename V::Scalar;
  constexpr int64_t W = V::kWidth;
  constexpr int64_t kBlock = 2 * W * kFlushIters;
  if (n < kBlock) {  // under 2*kFlushIters terms a lane: summed, then across lanes, in T (as short_run_shifted_sums)
    run_grad_sums_short<V>(dy, x, n, mean_hi, sum_dy, sum_dy_xc, sum_xc);
    return;
  }
  const V m = V::broadcast(mean_hi);
  typename V::Acc s_dy = V::acc_zero(), s_dy_xc = V::acc_zero(), s_xc = V::acc_zero();
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    GradLanes<V> a, b;
#pragma GCC unroll 2  // as in run_shifted_sums
    for (int64_t k = 0; k < kBlock; k += 2 * W) {
      V ga, gb, la, lb;
      load_split(dy + i + k, ga, gb);  // dy and x in the same lane order, any: every lane is summed
      load_split(x + i + k, la, lb);
      a.add(ga, la - m);
      b.add(gb, lb - m);
    }
    V::acc_add(s_dy, a.dy + b.dy);
    V::acc_add(s_dy_xc, a.dy_xc + b.dy_xc);
    V::acc_add(s_xc, a.xc + b.xc);
  }
  GradLanes<V> rest;
  for (; i + W <= n; i += W) rest.add(V::load(dy + i), V::load(x + i) - m);
  if (i < n)  // filled lanes give dy = 0 and x - mean_hi = 0
    rest.add(V::load_tail(dy + i, n - i, T(0)), V::load_tail(x + i, n - i, mean_hi) - m);
  V::acc_add(s_dy, rest.dy);
  V::acc_add(s_dy_xc, rest.dy_xc);
  V::acc_add(s_xc, rest.xc);
  *sum_dy = V::acc_sum(s_dy);
  *sum_dy_xc = V::acc_sum(s_dy_xc);
  *sum_xc = V::acc_sum(s_xc);
}

// The backward's first pass over a bfloat16 run with vdpbf16ps where the level has AVX512_BF16 (kDotSums): the
// plain sums of dy, dy*x and x, from which the centred ones follow as dy*x - mean_hi*dy and x - mean_hi; with
// them dy*dy and x*x, which say whether the plain sums will do. Groups whose mean lies more than a standard
// deviation (as rstd gives it, eps included) from 0 skip it (dot_grad_ok); a run is summed again the exact way
// unless its dy*dy averages at least 2^-100 (gradients near bfloat16's subnormals, which vdpbf16ps takes as 0,
// and NaNs fail), and its own variance is at least mean_hi^2, 2^-16 of its own squared mean and 2^-100 (so the
// centring cancels little and inputs below 2^-126 are negligible beside the spread: a run of equal values or of
// subnormals, whose exact centred sums are 0 or nearly, takes the exact path; the fuzz test found one). Five dot
// products for 32 values against run_grad_sums's widening of both, subtraction, two adds and fma for 16.
inline bool dot_grad_ok(double mean, double rstd) { return std::fabs(mean * rstd) <= 1.0; }

template <class V, class S>
void dot_grad_sums(const S* dy, const S* x, int64_t n, typename V::Scalar mean_hi, double* sum_dy,
                   double* sum_dy_xc, double* sum_xc) {
  typename V::Acc a_dy = V::acc_zero(), a_dy_x = V::acc_zero(), a_x = V::acc_zero(), a_dy_dy = V::acc_zero(),
                  a_x_x = V::acc_zero();
  V::dot_grad_sums_bf16(dy, x, n, a_dy, a_dy_x, a_x, a_dy_dy, a_x_x);
  const double s_dy = V::acc_sum(a_dy), s_dy_x = V::acc_sum(a_dy_x), s_x = V::acc_sum(a_x);
  const double inv_n = 1.0 / double(n), m = double(mean_hi), run_mean = s_x * inv_n;
  const double run_var = V::acc_sum(a_x_x) * inv_n - run_mean * run_mean;  // false below for a NaN or inf
  if (!(V::acc_sum(a_dy_dy) * inv_n >= 0x1p-100) || !(s_dy_x - s_dy_x == 0.0) ||
      !(run_var >= m * m && run_var >= 0x1p-16 * run_mean * run_mean && run_var >= 0x1p-100)) {
    run_grad_sums<V>(dy, x, n, mean_hi, sum_dy, sum_dy_xc, sum_xc);
    return;
  }
  *sum_dy = s_dy;
  *sum_dy_xc = s_dy_x - m * s_dy;
  *sum_xc = s_x - double(n) * m;
}

// grad_apply_run's vector pairs [0, end), their lanes in any order (load_split); a function with its
// coefficients as values, as apply_pairs.
template <class V, bool kInputNaNs, class S>
__attribute__((always_inline)) inline void grad_apply_pairs(const S* dy, const S* x, S* dx, int64_t end, V m,
                                                            V scale, V c2, V shift) {
  constexpr int64_t W = V::kWidth;
  for (int64_t i = 0; i < end; i += 2 * W) {
    V ga, gb, xa, xb;
    load_split(dy + i, ga, gb);
    load_split(x + i, xa, xb);
    store_split<V, false, kInputNaNs>(dx + i, fma(ga, scale, fma(xa - m, c2, shift)),
                                      fma(gb, scale, fma(xb - m, c2, shift)));
  }
}

// Pass 2 over one contiguous run of one channel: dx = dy*scale + (x - mean_hi)*c2 + shift.
template <class V, class S>
void grad_apply_run(const S* dy, const S* x, S* dx, int64_t n, typename V::Scalar scale_t,
                    const GroupGradCoeffs<typename V::Scalar>& k) {
  using T = typename V::Scalar;
  constexpr int64_t W = V::kWidth;
  const V m = V::broadcast(k.mean_hi), scale = V::broadcast(scale_t), c2 = V::broadcast(k.c2),
          shift = V::broadcast(k.shift);
  // Finite coefficients: dy and x hold no NaN (c2 and shift run through every sum of both; values_clean).
  const int64_t pairs_end = n / (2 * W) * 2 * W;
  with_input_nans<S>(values_clean({k.mean_hi, scale_t, k.c2, k.shift}), [&](auto input_nans) {
    grad_apply_pairs<V, decltype(input_nans)::value>(dy, x, dx, pairs_end, m, scale, c2, shift);
  });
  int64_t i = pairs_end;
  for (; i + W <= n; i += W) V::store(dx + i, fma(V::load(dy + i), scale, fma(V::load(x + i) - m, c2, shift)));
  if (i < n) {
    const V t = fma(V::load_tail(dy + i, n - i, T(0)), scale, fma(V::load_tail(x + i, n - i, T(0)) - m, c2, shift));
    V::store_tail(dx + i, t, n - i);
  }
}

// Group (n, g)'s coefficients from its channels' sums in `sums` (indexed n*C + c).
template <class T, class S>
GroupGradCoeffs<T> group_grad_coeffs(const Problem& p, int64_t ng, const GradSums& sums, const S* mean,
                                     const S* rstd, const S* weight) {
  const int64_t D = p.C / p.G, c0 = ng / p.G * p.C + ng % p.G * D;
  const double M = double(D) * double(p.HxW);
  double sum_xc = 0.0;
  for (int64_t d = 0; d < D; ++d) sum_xc += sums.xc[c0 + d];
  const double mean_lo = sum_xc / M;
  double ds = 0.0, db = 0.0;
  for (int64_t d = 0; d < D; ++d) {
    const double w = weight ? double(weight[ng % p.G * D + d]) : 1.0;
    ds += w * (sums.dy_xc[c0 + d] - mean_lo * sums.dy[c0 + d]);
    db += w * sums.dy[c0 + d];
  }
  return finish_grad_coeffs<T>(T(mean[ng]), mean_lo, double(rstd[ng]), ds, db, M);
}

// grad_weight[c] = sum_n dy*(x - mean)*rstd and grad_bias[c] = sum_n dy for channels [c0, c0 + kParamTile), each
// summed over n in order whatever the tiling: samples outermost, so every sweep reads a row of the sums
// contiguously (channel by channel, a large N strode C doubles a step: [256,512] spent 1 ms here).
constexpr int64_t kParamTile = 256;
inline int64_t param_tiles(const Problem& p) { return ceil_div(p.C, kParamTile); }

template <class T, class S>
void param_grads(const Problem& p, int64_t tile, const GradSums& sums, const GroupGradCoeffs<T>* coeffs, S* dweight,
                 S* dbias) {
  const int64_t D = p.C / p.G, c0 = tile * kParamTile, c1 = min_i64(p.C, c0 + kParamTile), width = c1 - c0;
  double dw[kParamTile], db[kParamTile];
  for (int64_t i = 0; i < width; ++i) dw[i] = db[i] = 0.0;
  for (int64_t n = 0; n < p.N; ++n) {
    const double* const dy_xc = sums.dy_xc + n * p.C;
    const double* const dy = sums.dy + n * p.C;
    const GroupGradCoeffs<T>* const k = coeffs + n * p.G;
    for (int64_t c = c0, g = c0 / D; c < c1; ++g) {  // a group's channels at a time: its coefficients are constants
      const int64_t end = min_i64(c1, (g + 1) * D);
      const double mean_lo = k[g].mean_lo, rstd = k[g].rstd;
      for (; c < end; ++c) {
        dw[c - c0] += (dy_xc[c] - mean_lo * dy[c]) * rstd;
        db[c - c0] += dy[c];
      }
    }
  }
  for (int64_t i = 0; i < width; ++i) {
    if (dweight) dweight[c0 + i] = S(dw[i]);
    if (dbias) dbias[c0 + i] = S(db[i]);
  }
}

// Adds chunk partials in chunk order: partial slot (outer, k, i), k < nchunks, i < inner, into out (outer, i).
// k runs outermost so every sweep is sequential (a stride of `inner` doubles thrashes L1 sets).
inline void merge_chunks(const GradSums& partial, const GradSums& out, int64_t outer, int64_t nchunks,
                         int64_t inner) {
  double* const dst[3] = {out.dy + outer * inner, out.dy_xc + outer * inner, out.xc + outer * inner};
  const double* const src[3] = {partial.dy + outer * nchunks * inner, partial.dy_xc + outer * nchunks * inner,
                                partial.xc + outer * nchunks * inner};
  for (int a = 0; a < 3; ++a) {
    for (int64_t i = 0; i < inner; ++i) dst[a][i] = src[a][i];
    for (int64_t k = 1; k < nchunks; ++k)
      for (int64_t i = 0; i < inner; ++i) dst[a][i] += src[a][k * inner + i];
  }
}

// ---------------------------------------------------------------------------------------------------------
// The SiLU's backward (Problem::activation == kSilu). The forward returned z = u*sigmoid(u) of the normalised
// u = (x - mean)*rstd*w + b, so the normalisation's backward runs on dy = dz*silu'(u), with
// silu'(u) = s*(1 + u*(1 - s)) and s = sigmoid(u) (torch's silu_backward). u is recomputed from x and the saved
// statistics, centred on the mean as given (as gn_cuda_backward does) plus, where it matters, the low part that
// a float mean drops. Each path below writes a unit's dy (a channel's chunk, rows of a sample, a block of
// samples) into dx just before pass 1 reads that unit, while it is in cache; both passes then read dy from dx,
// and pass 2 overwrites it in place. In float16 and bfloat16, dy is rounded to the storage type in between, as
// torch's unfused silu and group_norm round it.

template <class V>
__attribute__((always_inline)) inline V silu_derivative(V u) {
  const V one = V::broadcast(typename V::Scalar(1));
  const V s = one / one_plus_exp_neg(u);
  return s * fma(u, one - s, one);
}

// dy of n contiguous values whose u is (x - mean)*scale + shift with the same coefficients (a channel's run).
template <class V, class S>
void silu_grad_run(const S* dz, const S* x, S* dy, int64_t n, V mean, V scale, V shift) {
  using T = typename V::Scalar;
  constexpr int64_t W = V::kWidth;
  auto value = [mean, scale, shift](const V& g, const V& xv) {  // by value: kept in registers across the stores
    return g * silu_derivative(fma(xv - mean, scale, shift));
  };
  int64_t i = 0;
  for (; i + W <= n; i += W) V::store(dy + i, value(V::load(dz + i), V::load(x + i)));
  if (i < n) V::store_tail(dy + i, value(V::load_tail(dz + i, n - i, T(0)), V::load_tail(x + i, n - i, T(0))), n - i);
}

// dy of one row of C channels, each with its own coefficients (arrays padded to whole vectors).
template <class V, class S>
void silu_grad_row(const S* dz, const S* x, S* dy, int64_t C, const typename V::Scalar* mean,
                   const typename V::Scalar* scale, const typename V::Scalar* shift) {
  using T = typename V::Scalar;
  constexpr int64_t W = V::kWidth;
  auto value = [&](const V& g, const V& xv, int64_t c) {
    return g * silu_derivative(fma(xv - V::load(mean + c), V::load(scale + c), V::load(shift + c)));
  };
  int64_t c = 0;
  for (; c + W <= C; c += W) V::store(dy + c, value(V::load(dz + c), V::load(x + c), c));
  if (c < C)
    V::store_tail(dy + c, value(V::load_tail(dz + c, C - c, T(0)), V::load_tail(x + c, C - c, T(0)), c), C - c);
}

// One call's SiLU pass: its inputs, and the groups' mean_lo (filled by group_lo before a group's first unit).
template <class V, class S>
struct SiluPass {
  using T = typename V::Scalar;
  const Problem& p;
  const S* dz;
  const S* x;
  S* dx;
  const T *mean, *rstd, *weight, *bias;
  double* mean_lo;  // N*G

  // The part of group ng's mean that its T value drops, (sum of x - mean_hi) / M, where it matters to u: when
  // |mean|*rstd > 1, half an ulp of mean_hi moves u by more than float rounding of u near 1 does (data with a
  // large offset: a group of [1,320,64,64] at 1e4 +- 1.5 would otherwise see u off by 3e-4). 0 elsewhere.
  void group_lo(int64_t ng) const {
    mean_lo[ng] = 0.0;
    if (!(std::fabs(double(mean[ng])) * double(rstd[ng]) > 1.0)) return;
    const int64_t D = p.C / p.G, n = ng / p.G, g = ng % p.G;
    const double M = double(D) * double(p.HxW);
    if (p.layout == Layout::kChannelsFirst || p.HxW == 1)  // the group is one contiguous run
      mean_lo[ng] = any_run_shifted_sums<V>(x + ng * D * p.HxW, D * p.HxW, mean[ng]).s1 / M;
    else
      mean_lo[ng] = strided_shifted_sums<V>(x + n * p.HxW * p.C + g * D, D, p.C, p.HxW, mean[ng]).s1 / M;
  }
  double scale(int64_t n, int64_t c) const {
    return double(rstd[n * p.G + c / (p.C / p.G)]) * (weight ? double(weight[c]) : 1.0);
  }
  T shift(int64_t n, int64_t c) const {
    return T((bias ? double(bias[c]) : 0.0) - mean_lo[n * p.G + c / (p.C / p.G)] * scale(n, c));
  }
  // Channels-first: values [begin, begin + len) of channel nc = n*C + c.
  void channel(int64_t nc, int64_t begin, int64_t len) const {
    const int64_t n = nc / p.C, c = nc % p.C, off = nc * p.HxW + begin;
    silu_grad_run<V>(dz + off, x + off, dx + off, len, V::broadcast(mean[n * p.G + c / (p.C / p.G)]),
                     V::broadcast(T(scale(n, c))), V::broadcast(shift(n, c)));
  }
  // Rows of channels (q: p, or p's rows taken `fold` at a time, row_fold): sample n's coefficients into m, sc, sh
  // (c_padded values each, padding 0) for q's rows of q.C = fold * p.C channels, then rows [r0, r1) of q's sample.
  void fill_sample(int64_t n, T* m, T* sc, T* sh, int64_t c_padded, int64_t fold) const {
    for (int64_t c = 0; c < p.C; ++c) {
      m[c] = mean[n * p.G + c / (p.C / p.G)];
      sc[c] = T(scale(n, c));
      sh[c] = shift(n, c);
    }
    for (T* a : {m, sc, sh}) repeat_prefix(a, p.C, p.C * fold);
    for (int64_t c = p.C * fold; c < c_padded; ++c) m[c] = sc[c] = sh[c] = T(0);
  }
  // (q may also be p, for the rows past q's: fold_remainder; a sample is p.HxW * p.C values either way.)
  void rows(const Problem& q, int64_t n, int64_t r0, int64_t r1, const T* m, const T* sc, const T* sh) const {
    const int64_t sample = n * p.HxW * p.C;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t off = sample + r * q.C;
      silu_grad_row<V>(dz + off, x + off, dx + off, q.C, m, sc, sh);
    }
  }
  // Whole samples [n0, n1), either layout with HxW <= kShortRun (the short-run path): their groups' mean_lo,
  // then channel by channel (one position: a channel is a single value, so a group's run goes at once with the
  // weights and biases loaded as vectors).
  void samples(int64_t n0, int64_t n1) const {
    const int64_t D = p.C / p.G;
    for (int64_t ng = n0 * p.G; ng < n1 * p.G; ++ng) group_lo(ng);
    if (p.HxW > 1) {
      for (int64_t nc = n0 * p.C; nc < n1 * p.C; ++nc) channel(nc, 0, p.HxW);
      return;
    }
    constexpr int64_t W = V::kWidth;
    for (int64_t ng = n0 * p.G; ng < n1 * p.G; ++ng) {
      const int64_t c0 = ng % p.G * D, off = ng * D;
      const V m = V::broadcast(mean[ng]), r = V::broadcast(rstd[ng]), lo = V::broadcast(T(mean_lo[ng]));
      for (int64_t i = 0; i < D; i += W) {
        const int64_t k = min_i64(W, D - i);
        const V w = !weight ? V::broadcast(T(1))
                    : k == W ? V::load(weight + c0 + i)
                             : V::load_tail(weight + c0 + i, k, T(0));
        const V b = !bias ? V::zero() : k == W ? V::load(bias + c0 + i) : V::load_tail(bias + c0 + i, k, T(0));
        const V sc = r * w, sh = b - lo * sc;
        const V g = k == W ? V::load(dz + off + i) : V::load_tail(dz + off + i, k, T(0));
        const V xv = k == W ? V::load(x + off + i) : V::load_tail(x + off + i, k, T(0));
        const V out = g * silu_derivative(fma(xv - m, sc, sh));
        if (k == W)
          V::store(dx + off + i, out);
        else
          V::store_tail(dx + off + i, out, k);
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------------------
// Channels-first (NCHW): channel (n, c) is one contiguous run of HxW elements, cut into fixed chunks.

template <class V, class S>
Status backward_channels_first(const Problem& p, const S* dy, const S* x, const typename V::Scalar* mean,
                               const typename V::Scalar* rstd, const typename V::Scalar* weight, S* dx,
                               typename V::Scalar* dweight, typename V::Scalar* dbias, const GradSums& sums,
                               GroupGradCoeffs<typename V::Scalar>* coeffs, const SiluPass<V, S>* silu) {
  using T = typename V::Scalar;
  const int64_t D = p.C / p.G, HxW = p.HxW, groups = p.N * p.G, channels = p.N * p.C;
  const int64_t chunk_len = ceil_div(max_i64(ceil_div(HxW, kChunksMax), kChunkMinElems), 64) * 64;
  const int64_t nchunks = ceil_div(HxW, chunk_len);
  const int64_t units = channels * nchunks;
  Scratch<double> chunk_block(nchunks > 1 ? 3 * units : 0);
  if (!chunk_block.data) return kOutOfMemory;
  const GradSums partial = nchunks > 1 ? grad_sums_in(chunk_block.data, units) : sums;
  const bool want_params = dweight || dbias;

  // Chunk k of channel nc (in group ng); callers pass all three so small channels pay no division.
  auto chunk_sums = [&](int64_t nc, int64_t k, int64_t ng) {
    const int64_t unit = nc * nchunks + k, begin = k * chunk_len, len = min_i64(chunk_len, HxW - begin);
    if (silu) silu->channel(nc, begin, len);  // dy (here dx) of the chunk, while pass 1 has it in cache
    if constexpr (kDotSums<V, S>) {
      if (dot_grad_ok(double(mean[ng]), double(rstd[ng]))) {
        dot_grad_sums<V>(dy + nc * HxW + begin, x + nc * HxW + begin, len, T(mean[ng]), partial.dy + unit,
                         partial.dy_xc + unit, partial.xc + unit);
        return;
      }
    }
    run_grad_sums<V>(dy + nc * HxW + begin, x + nc * HxW + begin, len, T(mean[ng]), partial.dy + unit,
                     partial.dy_xc + unit, partial.xc + unit);
  };
  auto channel_merge = [&](int64_t nc) {
    if (nchunks > 1) merge_chunks(partial, sums, nc, nchunks, 1);
  };
  auto group_finish = [&](int64_t ng) { coeffs[ng] = group_grad_coeffs<T>(p, ng, sums, mean, rstd, weight); };
  auto chunk_apply = [&](int64_t nc, int64_t k, int64_t ng, int64_t c) {
    const int64_t begin = k * chunk_len;
    const GroupGradCoeffs<T>& coeff = coeffs[ng];
    const int64_t off = nc * HxW + begin, len = min_i64(chunk_len, HxW - begin);
    if (coeff.wide) {
      wide_grad_apply<T>(dy + off, x + off, dx + off, len, 1, weight ? weight + c : nullptr, 0, coeff);
      return;
    }
    const T scale = T(coeff.rstd * (weight ? double(weight[c]) : 1.0));
    grad_apply_run<V>(dy + off, x + off, dx + off, len, scale, coeff);
  };
  auto whole_group = [&](int64_t ng) {
    if (silu) silu->group_lo(ng);
    for (int64_t nc = ng * D; nc < (ng + 1) * D; ++nc) {
      for (int64_t k = 0; k < nchunks; ++k) chunk_sums(nc, k, ng);
      channel_merge(nc);
    }
    group_finish(ng);
    const int64_t c0 = ng % p.G * D;
    for (int64_t d = 0; d < D; ++d)
      for (int64_t k = 0; k < nchunks; ++k) chunk_apply(ng * D + d, k, ng, c0 + d);
  };

  const int nt = team_size(p.num_threads, 2 * channels * HxW, units);
  if (nt == 1) {  // no OpenMP region at all: a tiny call must not pay for a team
    for (int64_t ng = 0; ng < groups; ++ng) whole_group(ng);
    if (want_params)
      for (int64_t tile = 0; tile < param_tiles(p); ++tile) param_grads(p, tile, sums, coeffs, dweight, dbias);
    return kOk;
  }
  // Whole groups per thread keep a group in cache between its two passes; split groups when too few.
  const bool whole_groups = groups % nt == 0 || groups >= 8 * int64_t(nt);
#pragma omp parallel num_threads(nt)
  {
    if (whole_groups) {
#pragma omp for schedule(static)
      for (int64_t ng = 0; ng < groups; ++ng) whole_group(ng);
    } else {
      if (silu) {
#pragma omp for schedule(static)
        for (int64_t ng = 0; ng < groups; ++ng) silu->group_lo(ng);
      }
#pragma omp for schedule(static)
      for (int64_t unit = 0; unit < units; ++unit) chunk_sums(unit / nchunks, unit % nchunks, unit / nchunks / D);
#pragma omp for schedule(static)
      for (int64_t nc = 0; nc < channels; ++nc) channel_merge(nc);
#pragma omp for schedule(static)
      for (int64_t ng = 0; ng < groups; ++ng) group_finish(ng);
#pragma omp for schedule(static)
      for (int64_t unit = 0; unit < units; ++unit) {
        const int64_t nc = unit / nchunks;
        chunk_apply(nc, unit % nchunks, nc / D, nc % p.C);
      }
    }
    if (want_params) {
#pragma omp for schedule(static)
      for (int64_t tile = 0; tile < param_tiles(p); ++tile) param_grads(p, tile, sums, coeffs, dweight, dbias);
    }
  }
  return kOk;
}

// ---------------------------------------------------------------------------------------------------------
// Channels-last (N, HxW, C): a sample is HxW rows of C channels, cut into fixed chunks of rows; pass 1 keeps
// per-channel sums vectorised across C, pass 2 applies per-channel coefficients row by row.

// Per-thread buffers of the channels-last backward, C rounded up to whole vectors, carved from one block.
template <class T>
struct GradRowBuffers {
  int64_t padded;
  Scratch<double> block;
  T* mean_hi;                                // pass 1: centering value
  T *scale, *c2, *shift;                     // pass 2: per-channel coefficients of the current sample
  T *silu_mean, *silu_scale, *silu_shift;    // the SiLU pass's coefficients of its current sample
  bool clean = false;                        // values_clean(the sample's coefficients)
  explicit GradRowBuffers(int64_t c_padded) : padded(c_padded), block(7 * c_padded) {
    double* base = block.data;  // each array gets c_padded doubles of room, enough for any T
    T** arrays[] = {&mean_hi, &scale, &c2, &shift, &silu_mean, &silu_scale, &silu_shift};
    for (int i = 0; i < 7; ++i) *arrays[i] = reinterpret_cast<T*>(base + i * c_padded);
  }
  bool ok() const { return block.data != nullptr; }
};

// Sums over rows [r0, r1) of K vectors of channels starting at c into out[c, c + K*W) (with kTail, one vector of
// which only `count` channels exist, the rest read as 0 - 0, and only those written). Runs of kFlushIters rows sum
// in T in registers, as everywhere; each run then widens into lane-wise double accumulators (V::Acc), which go to
// out once. Before, each run went through b's T arrays into out's doubles, one pass over every
// channel a run, and that flush took about a tenth of the channels-last backward (flushing every 64 rows instead
// of 16 ran bfloat16 [1,320,64,64] in 0.87x the time). This keeps the 16-row runs. Against that flush, at 2
// threads on AVX-512 by minima: float32 0.90-0.97x the time over six cases, bfloat16 [1,320,64,64] 0.93-0.97x
// and 0.93-1.05x elsewhere. Every channel adds the same runs in the same order as before (0 + run 1 + run 2 ...),
// so the sums are the same to the bit.
template <class V, int K, bool kTail, class S>
void column_grad_sums(const S* dy, const S* x, int64_t C, int64_t c, int64_t count, int64_t r0, int64_t r1,
                      const typename V::Scalar* mean_hi, const GradSums& out) {
  using T = typename V::Scalar;
  using Acc = typename V::Acc;
  constexpr int64_t W = V::kWidth;
  V m[K];
  Acc a_dy[K], a_dy_xc[K], a_xc[K];
#pragma GCC unroll 8
  for (int i = 0; i < K; ++i) {
    m[i] = V::load(mean_hi + c + i * W);
    a_dy[i] = a_dy_xc[i] = a_xc[i] = V::acc_zero();
  }
  for (int64_t rb = r0; rb < r1; rb += kFlushIters) {
    const int64_t re = min_i64(r1, rb + kFlushIters);
    V s_dy[K], s_dy_xc[K], s_xc[K];
#pragma GCC unroll 8
    for (int i = 0; i < K; ++i) s_dy[i] = s_dy_xc[i] = s_xc[i] = V::zero();
    for (int64_t r = rb; r < re; ++r) {
      const S* dy_row = dy + r * C + c;
      const S* x_row = x + r * C + c;
      for (int i = 0; i < K; ++i) {
        const V g = kTail ? V::load_tail(dy_row, count, T(0)) : V::load(dy_row + i * W);
        const V xc = (kTail ? V::load_tail(x_row, count, T(0)) : V::load(x_row + i * W)) - m[i];
        s_dy[i] = s_dy[i] + g;
        s_dy_xc[i] = fma(g, xc, s_dy_xc[i]);
        s_xc[i] = s_xc[i] + xc;
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < K; ++i) {
      V::acc_add(a_dy[i], s_dy[i]);
      V::acc_add(a_dy_xc[i], s_dy_xc[i]);
      V::acc_add(a_xc[i], s_xc[i]);
    }
  }
  store_accs<V, K, kTail>(out.dy + c, a_dy, count);
  store_accs<V, K, kTail>(out.dy_xc + c, a_dy_xc, count);
  store_accs<V, K, kTail>(out.xc + c, a_xc, count);
}

// Per-channel sums of rows [r0, r1) of one sample into out[0, C); b.mean_hi holds the sample's group means. Tiles
// of 4 vectors of channels over all the rows. Their double accumulators (24 registers; 12 for float64 data and on
// the scalar level) outnumber the registers left, so the compiler keeps some in memory, touched once a run. Tiles
// of 2 on AVX-512 (all in registers) ran no faster, and tiles of 1 on AVX2 ran 1.10-1.15x slower (probably too few
// independent sums to cover the FMA latency).
template <class V, class S>
void rows_grad_sums(const Problem& p, const S* dy, const S* x, int64_t r0, int64_t r1,
                    GradRowBuffers<typename V::Scalar>& b, const GradSums& out) {
  constexpr int64_t W = V::kWidth;
  constexpr int K = 4;
  const int64_t C = p.C, c_full = C / W * W;
  int64_t c = 0;
  for (; c + K * W <= c_full; c += K * W) column_grad_sums<V, K, false>(dy, x, C, c, C, r0, r1, b.mean_hi, out);
  for (; c < c_full; c += W) column_grad_sums<V, 1, false>(dy, x, C, c, C, r0, r1, b.mean_hi, out);
  if (c < C) column_grad_sums<V, 1, true>(dy, x, C, c, C - c, r0, r1, b.mean_hi, out);
}

// Per-channel sums of one sample's rows [r0, p.HxW) into out[0, p.C), in double, centered on mean_hi (p.C values
// or more): the few rows past a folded problem's (fold_remainder).
template <class T, class S>
void rest_grad_sums(const Problem& p, const S* dy, const S* x, int64_t r0, const T* mean_hi, const GradSums& out) {
  for (int64_t c = 0; c < p.C; ++c) {
    double s_dy = 0.0, s_dy_xc = 0.0, s_xc = 0.0;
    for (int64_t r = r0; r < p.HxW; ++r) {
      const double g = double(widen(dy[r * p.C + c])), xc = double(widen(x[r * p.C + c])) - double(mean_hi[c]);
      s_dy += g;
      s_dy_xc += g * xc;
      s_xc += xc;
    }
    out.dy[c] = s_dy;
    out.dy_xc[c] = s_dy_xc;
    out.xc[c] = s_xc;
  }
}

// Spreads sample n's group means over its channels (padding 0), for pass 1; over `fold` copies of them for rows
// taken fold at a time (row_fold).
template <class T, class S>
void sample_means(const Problem& p, const S* mean, int64_t n, int64_t fold, GradRowBuffers<T>& b) {
  const int64_t D = p.C / p.G;
  for (int64_t g = 0; g < p.G; ++g)
    for (int64_t c = g * D; c < (g + 1) * D; ++c) b.mean_hi[c] = T(mean[n * p.G + g]);
  repeat_prefix(b.mean_hi, p.C, p.C * fold);
  for (int64_t c = p.C * fold; c < b.padded; ++c) b.mean_hi[c] = T(0);
}

// Spreads sample n's group coefficients over its channels (padding 0), for pass 2: mean_hi too (pass 1 reloads
// its centering values per sample), in load_split's lane order where V has one for S (split_order), as
// rows_grad_apply reads them.
template <class V, class S, class T, class P>
void sample_grad_coeffs(const Problem& p, const GroupGradCoeffs<T>* coeffs, const P* weight, int64_t fold,
                        GradRowBuffers<T>& b) {
  const int64_t D = p.C / p.G, C = p.C * fold;  // fold copies of the channels for rows taken fold at a time
  for (int64_t g = 0; g < p.G; ++g) {
    const GroupGradCoeffs<T>& k = coeffs[g];
    for (int64_t c = g * D; c < (g + 1) * D; ++c) {
      b.mean_hi[c] = k.mean_hi;
      b.scale[c] = T(k.rstd * (weight ? double(weight[c]) : 1.0));
      b.c2[c] = k.c2;
      b.shift[c] = k.shift;
    }
  }
  for (T* a : {b.mean_hi, b.scale, b.c2, b.shift}) {
    repeat_prefix(a, p.C, C);
    for (int64_t c = C; c < b.padded; ++c) a[c] = T(0);
  }
  b.clean = values_clean<T>({b.mean_hi, b.scale, b.c2, b.shift}, C);
  if constexpr (HasSplit<V, S>::value)
    for (T* a : {b.mean_hi, b.scale, b.c2, b.shift}) split_order<V::kWidth>(a, C);
}

// Pass 2 over rows [r0, r1) of one sample: vector pairs through load_split (the coefficients in its lane order,
// sample_grad_coeffs), then single vectors and a masked tail. With kRows > 1, kRows rows at a time, each vector of
// coefficients loaded once for all of them: a row at a time spent more loads on the four coefficients than on dy
// and x, and bound [1,320,16,16] channels-last's backward to 1.6x its NCHW time on AVX-512 from L2 (pass 2 was half
// the call). From L3, where it is the memory's pace, kRows row streams at once lose to one: the caller picks.
template <class V, bool kInputNaNs, int64_t kRows, class S>
void rows_grad_apply(const Problem& p, const S* dy, const S* x, S* dx, int64_t r0, int64_t r1,
                     const GradRowBuffers<typename V::Scalar>& b) {
  using T = typename V::Scalar;
  constexpr int64_t W = V::kWidth;
  const int64_t C = p.C, c_full = C / W * W;
  // The four coefficients of the channel vector at c, loaded once for the rows of a sweep (in registers: the
  // compiler may not reuse them across stores to dx, which could alias them for all it knows).
  struct Coeffs {
    V mean_hi, scale, c2, shift;
  };
  // The arrays' addresses as locals: read through b, GCC reloaded them after every store to dx (a vector store may
  // alias anything), five scalar loads a vector pair. With the locals, bfloat16 channels-last [1,320,64,64]
  // backwards took 0.90x the time at 2 threads by minima (within noise at 1 thread and from L2).
  const T* const mean_hi = b.mean_hi;
  const T* const scale = b.scale;
  const T* const c2 = b.c2;
  const T* const shift = b.shift;
  auto coeffs_at = [&](int64_t c) {
    return Coeffs{V::load(mean_hi + c), V::load(scale + c), V::load(c2 + c), V::load(shift + c)};
  };
  auto value = [](const V& g, const V& xv, const Coeffs& k) {
    return fma(g, k.scale, fma(xv - k.mean_hi, k.c2, k.shift));
  };
  // Rows [r, r + rows.value) of every channel vector.
  auto sweep = [&](int64_t r, auto rows) {
    int64_t c = 0;
    for (; c + 2 * W <= c_full; c += 2 * W) {
      const Coeffs ka = coeffs_at(c), kb = coeffs_at(c + W);
#pragma GCC unroll 4
      for (int64_t j = 0; j < rows.value; ++j) {
        const int64_t at = (r + j) * C + c;
        V ga, gb, xa, xb;
        load_split(dy + at, ga, gb);
        load_split(x + at, xa, xb);
        store_split<V, false, kInputNaNs>(dx + at, value(ga, xa, ka), value(gb, xb, kb));
      }
    }
    for (; c < c_full; c += W) {
      const Coeffs k = coeffs_at(c);
#pragma GCC unroll 4
      for (int64_t j = 0; j < rows.value; ++j) {
        const int64_t at = (r + j) * C + c;
        V::store(dx + at, value(V::load(dy + at), V::load(x + at), k));
      }
    }
    if (c < C) {
      const Coeffs k = coeffs_at(c);
      for (int64_t j = 0; j < rows.value; ++j) {
        const int64_t at = (r + j) * C + c;
        V::store_tail(dx + at, value(V::load_tail(dy + at, C - c, T(0)), V::load_tail(x + at, C - c, T(0)), k), C - c);
      }
    }
  };
  int64_t r = r0;
  for (; r + kRows <= r1; r += kRows) sweep(r, std::integral_constant<int64_t, kRows>());
  for (; r < r1; ++r) sweep(r, std::integral_constant<int64_t, 1>());
}

template <class V, class S>
Status backward_channels_last(const Problem& p, const S* dy, const S* x, const typename V::Scalar* mean,
                              const typename V::Scalar* rstd, const typename V::Scalar* weight, S* dx,
                              typename V::Scalar* dweight, typename V::Scalar* dbias, const GradSums& sums,
                              GroupGradCoeffs<typename V::Scalar>* coeffs, const SiluPass<V, S>* silu) {
  using T = typename V::Scalar;
  // Both passes walk rows of q: p's rows taken fold at a time where they are narrower than whole vectors
  // (row_fold, as the forward). Pass 1's sums then come per channel of q's rows (C of them a sample, in
  // `folded`) and add up, fold by fold, to p's channels (Cr) in `sums`; the groups' coefficients, the parameter
  // gradients, the SiLU's mean_lo and the rare wide groups take p's channels and rows.
  // A sample's last `rest` rows of p (fold_remainder), past q's, go with its last chunk, channel by channel.
  const int64_t fold = row_fold(p, V::kWidth), rest = fold_remainder(p, fold), Cr = p.C, Gr = p.G, D = Cr / Gr;
  const Problem q = folded_problem(p, fold);
  const int64_t rows = q.HxW, C = q.C, sample_len = p.HxW * Cr, rest_row = rows * fold;
  const int64_t chunk_rows = max_i64(ceil_div(kChunkMinElems, C), ceil_div(rows, kChunksMax));
  const int64_t nchunks = ceil_div(rows, chunk_rows);
  const int64_t units = p.N * nchunks;
  const int64_t c_padded = ceil_div(C, V::kWidth) * V::kWidth;
  Scratch<double> chunk_block(nchunks > 1 ? 3 * units * C : 0);
  Scratch<double> folded_block(fold > 1 ? 3 * p.N * C : 0);
  Scratch<double> rest_block(rest ? 3 * p.N * Cr : 0);
  if (!chunk_block.data || !folded_block.data || !rest_block.data) return kOutOfMemory;
  const GradSums rest_sums = grad_sums_in(rest_block.data, p.N * Cr);
  const GradSums folded = fold > 1 ? grad_sums_in(folded_block.data, p.N * C) : sums;  // per channel of q
  const GradSums partial = nchunks > 1 ? grad_sums_in(chunk_block.data, units * C) : folded;
  const bool want_params = dweight || dbias;
  const int nt = team_size(p.num_threads, 2 * p.N * sample_len, units);
  const bool whole_samples = p.N % nt == 0 || p.N >= 8 * int64_t(nt);
  // Pass 2 takes 4 rows at a time (rows_grad_apply) where dy and x of what a thread sums before applying (a sample,
  // or its share of the chunks) stay in L2, so that loads, not the memory, bind it: [2,512,14,14], [1,64,32,32] and
  // [1,320,16,16] channels-last took 0.81-0.96 of the time in float32 and bfloat16 on AVX-512 (AVX2: 0.95-1.0).
  // 16-bit data take 4 rows too where dy, x and dx of the whole call fit half the last-level cache: pass 2 then
  // reads from L3, and the four coefficient loads a vector (pair) bind it, not the memory. Back to back at 2 threads
  // on AVX-512 (minima): bfloat16 [1,320,64,64] 0.78-0.90 of the time, float16 0.69-0.94, bfloat16
  // [1,320,80,80] (12 MB) 0.79; past that, where pass 2 reads from DRAM, 1.0 at 17.7 MB and 1.35 at 31 MB.
  // float32 keeps one row from L3 (4 rows went 0.89-1.13x there, and up to 1.25x in earlier sessions), and so does
  // AVX2, whose 16 registers hold the four rows' coefficients and values with little room (1.04-1.09x in 16-bit).
  // Else one row at a time, in memory order: 2 read streams and 1 write stream where 4 rows are 8 and 4.
  const int64_t pending = whole_samples ? sample_len : ceil_div(units, nt) * chunk_rows * C;
  const double call_bytes = 3.0 * double(sizeof(S)) * double(p.N) * double(sample_len);  // dy, x and dx
  const bool in_llc = sizeof(S) == 2 && V::kRegisters >= 32 && call_bytes <= 0.5 * double(last_level_cache_bytes());
  const bool batched_rows = in_llc || 2 * pending * int64_t(sizeof(S)) <= kL2ResidentBytes;

  // b.mean_hi must hold sample unit / nchunks's means (and b.silu_* its SiLU coefficients: sample_silu).
  auto chunk_sums = [&](int64_t unit, GradRowBuffers<T>& b) {
    const int64_t n = unit / nchunks, k = unit % nchunks, r0 = k * chunk_rows, r1 = min_i64(rows, r0 + chunk_rows);
    const GradSums out = {partial.dy + unit * C, partial.dy_xc + unit * C, partial.xc + unit * C};
    if (silu) silu->rows(q, n, r0, r1, b.silu_mean, b.silu_scale, b.silu_shift);  // dy (here dx) of the rows
    rows_grad_sums<V>(q, dy + n * sample_len, x + n * sample_len, r0, r1, b, out);
    if (rest && k == nchunks - 1) {
      if (silu) silu->rows(p, n, rest_row, p.HxW, b.silu_mean, b.silu_scale, b.silu_shift);
      rest_grad_sums(p, dy + n * sample_len, x + n * sample_len, rest_row, b.mean_hi,
                     {rest_sums.dy + n * Cr, rest_sums.dy_xc + n * Cr, rest_sums.xc + n * Cr});
    }
  };
  auto sample_silu = [&](int64_t n, GradRowBuffers<T>& b) {
    if (silu) silu->fill_sample(n, b.silu_mean, b.silu_scale, b.silu_shift, b.padded, fold);
  };
  auto sample_finish = [&](int64_t n) {
    if (nchunks > 1) merge_chunks(partial, folded, n, nchunks, C);
    if (fold > 1) {  // q's channels c, c + Cr, ... are p's channel c: added in that order
      const double* const from[3] = {folded.dy + n * C, folded.dy_xc + n * C, folded.xc + n * C};
      const double* const from_rest[3] = {rest_sums.dy + n * Cr, rest_sums.dy_xc + n * Cr, rest_sums.xc + n * Cr};
      double* const to[3] = {sums.dy + n * Cr, sums.dy_xc + n * Cr, sums.xc + n * Cr};
      for (int a = 0; a < 3; ++a)
        for (int64_t c = 0; c < Cr; ++c) {
          double total = from[a][c];
          for (int64_t j = 1; j < fold; ++j) total += from[a][j * Cr + c];
          to[a][c] = rest ? total + from_rest[a][c] : total;
        }
    }
    for (int64_t ng = n * Gr; ng < (n + 1) * Gr; ++ng)
      coeffs[ng] = group_grad_coeffs<T>(p, ng, sums, mean, rstd, weight);
  };
  auto chunk_apply = [&](int64_t n, int64_t k, const GradRowBuffers<T>& b) {
    const int64_t r0 = k * chunk_rows, r1 = min_i64(rows, (k + 1) * chunk_rows);
    // A sample holding a wide group (rare) goes channel by channel in Wide<T>, every group of it: the vector pass
    // writes whole rows, and in place it would overwrite the wide group's x or dy first.
    if (rest && k == nchunks - 1) {  // the sample's rows past q's (fold_remainder), channel by channel in Wide<T>
      const int64_t off = n * sample_len + rest_row * Cr;
      for (int64_t c = 0; c < Cr; ++c)
        wide_grad_apply<T>(dy + off + c, x + off + c, dx + off + c, rest, Cr, weight ? weight + c : nullptr, 0,
                           coeffs[n * Gr + c / D]);
    }
    bool wide = false;
    for (int64_t g = 0; g < Gr; ++g) wide |= coeffs[n * Gr + g].wide;
    if (wide) {  // in p's rows: q's rows [r0, r1) are fold times as many of p's
      const int64_t off = n * sample_len + r0 * C;
      for (int64_t c = 0; c < Cr; ++c)
        wide_grad_apply<T>(dy + off + c, x + off + c, dx + off + c, (r1 - r0) * fold, Cr,
                           weight ? weight + c : nullptr, 0, coeffs[n * Gr + c / D]);
      return;
    }
    with_input_nans<S>(b.clean, [&](auto input_nans) {
      constexpr bool kInputNaNs = decltype(input_nans)::value;
      const S* const dy_n = dy + n * sample_len;
      const S* const x_n = x + n * sample_len;
      if (batched_rows)
        rows_grad_apply<V, kInputNaNs, 4>(q, dy_n, x_n, dx + n * sample_len, r0, r1, b);
      else
        rows_grad_apply<V, kInputNaNs, 1>(q, dy_n, x_n, dx + n * sample_len, r0, r1, b);
    });
  };
  auto whole_sample = [&](int64_t n, GradRowBuffers<T>& b) {
    if (silu)
      for (int64_t ng = n * Gr; ng < (n + 1) * Gr; ++ng) silu->group_lo(ng);
    sample_silu(n, b);
    sample_means(p, mean, n, fold, b);
    for (int64_t k = 0; k < nchunks; ++k) chunk_sums(n * nchunks + k, b);
    sample_finish(n);
    sample_grad_coeffs<V, S>(p, coeffs + n * Gr, weight, fold, b);
    for (int64_t k = nchunks - 1; k >= 0; --k) chunk_apply(n, k, b);  // last summed first: still in cache
  };

  if (nt == 1) {  // no OpenMP region at all: a tiny call must not pay for a team
    GradRowBuffers<T> b(c_padded);
    if (!b.ok()) return kOutOfMemory;
    for (int64_t n = 0; n < p.N; ++n) whole_sample(n, b);
    if (want_params)
      for (int64_t tile = 0; tile < param_tiles(p); ++tile) param_grads(p, tile, sums, coeffs, dweight, dbias);
    return kOk;
  }
  int failed = 0;
#pragma omp parallel num_threads(nt) reduction(| : failed)
  {
    GradRowBuffers<T> b(c_padded);
    const bool ok = b.ok();
    failed |= ok ? 0 : 1;
    if (whole_samples) {
#pragma omp for schedule(static)
      for (int64_t n = 0; n < p.N; ++n)
        if (ok) whole_sample(n, b);
    } else {
      if (silu) {
#pragma omp for schedule(static)
        for (int64_t ng = 0; ng < p.N * Gr; ++ng) silu->group_lo(ng);
      }
      // Each thread applies its own chunks, last summed first: those are still in its cache.
      const ThreadRange mine = thread_range(units);
      int64_t means_of = -1;
      for (int64_t unit = mine.begin; unit < mine.end; ++unit) {
        if (!ok) continue;
        const int64_t n = unit / nchunks;
        if (n != means_of) {
          sample_means(p, mean, n, fold, b);
          sample_silu(n, b);
          means_of = n;
        }
        chunk_sums(unit, b);
      }
#pragma omp barrier
#pragma omp for schedule(static)
      for (int64_t n = 0; n < p.N; ++n) sample_finish(n);
      int64_t coeffs_of = -1;
      for (int64_t unit = mine.end - 1; unit >= mine.begin; --unit) {
        if (!ok) continue;
        const int64_t n = unit / nchunks;
        if (n != coeffs_of) {
          sample_grad_coeffs<V, S>(p, coeffs + n * Gr, weight, fold, b);
          coeffs_of = n;
        }
        chunk_apply(n, unit % nchunks, b);
      }
    }
    if (want_params) {  // after a failed buffer the sums are garbage, but the status reports it
#pragma omp for schedule(static)
      for (int64_t tile = 0; tile < param_tiles(p); ++tile) param_grads(p, tile, sums, coeffs, dweight, dbias);
    }
  }
  return failed ? kOutOfMemory : kOk;
}

// ---------------------------------------------------------------------------------------------------------
// Short runs: one position a sample (HxW = 1: an (N, C) input, either layout), or channels-first with at most
// kShortRun positions a channel. A group is then one contiguous run of L = D*HxW values, and a channel's run is
// too short for the paths above, which keep three double sums and three horizontal sums per (n, c). Here a
// group's weighted sums are a few vectors over its whole run, with the weights spread over the positions once a
// call (C*HxW values); the coefficients of all groups come first, then the parameter gradients from x and dy
// themselves (dx may be either), then dx: three sweeps, the later two from cache unless the input outgrows it.
// Group (n, g)'s coefficients from its L values (weight: one per value, from the group's first, or null).
template <class V, class S>
GroupGradCoeffs<typename V::Scalar> row_group_grad_coeffs(const S* dy, const S* x, int64_t L, double mean,
                                                          double rstd, const typename V::Scalar* weight) {
  using T = typename V::Scalar;
  constexpr int64_t W = V::kWidth;
  const T mean_hi = T(mean);
  const V m = V::broadcast(mean_hi);
  typename V::Acc a_xc = V::acc_zero(), a_wdy = V::acc_zero(), a_wdy_xc = V::acc_zero();
  for (int64_t c = 0; c < L;) {  // short runs in T, flushed to double
    V s_xc = V::zero(), s_wdy = V::zero(), s_wdy_xc = V::zero();
    for (int it = 0; it < kFlushIters && c < L; ++it, c += W) {
      const int64_t n = min_i64(W, L - c);  // filled lanes give dy = 0, w = 0 and x - mean_hi = 0
      const V g = n == W ? V::load(dy + c) : V::load_tail(dy + c, n, T(0));
      const V xc = (n == W ? V::load(x + c) : V::load_tail(x + c, n, mean_hi)) - m;
      const V wg = !weight ? g : (n == W ? V::load(weight + c) : V::load_tail(weight + c, n, T(0))) * g;
      s_xc = s_xc + xc;
      s_wdy = s_wdy + wg;
      s_wdy_xc = fma(wg, xc, s_wdy_xc);
    }
    V::acc_add(a_xc, s_xc);
    V::acc_add(a_wdy, s_wdy);
    V::acc_add(a_wdy_xc, s_wdy_xc);
  }
  const double M = double(L), mean_lo = V::acc_sum(a_xc) / M, wdy = V::acc_sum(a_wdy);
  const double ds = V::acc_sum(a_wdy_xc) - mean_lo * wdy;
  return finish_grad_coeffs<T>(mean_hi, mean_lo, rstd, ds, wdy, M);
}

// dx of one group's L values: dy*(rstd*w) + (x - mean_hi)*c2 + shift.
template <class V, class S>
void row_group_grad_apply(const S* dy, const S* x, S* dx, int64_t L, const GroupGradCoeffs<typename V::Scalar>& k,
                          const typename V::Scalar* weight) {
  using T = typename V::Scalar;
  constexpr int64_t W = V::kWidth;
  const V m = V::broadcast(k.mean_hi), rstd = V::broadcast(T(k.rstd)), c2 = V::broadcast(k.c2),
          shift = V::broadcast(k.shift);
  for (int64_t c = 0; c < L; c += W) {
    const int64_t n = min_i64(W, L - c);
    const V g = n == W ? V::load(dy + c) : V::load_tail(dy + c, n, T(0));
    const V xc = (n == W ? V::load(x + c) : V::load_tail(x + c, n, T(0))) - m;
    const V scale = !weight ? rstd : rstd * (n == W ? V::load(weight + c) : V::load_tail(weight + c, n, T(0)));
    const V out = fma(g, scale, fma(xc, c2, shift));
    if (n == W)
      V::store(dx + c, out);
    else
      V::store_tail(dx + c, out, n);
  }
}

// The short-run path's parameter gradients for tile `tile` of max(1, kParamTile / HxW) channels: at each position
// of its channels, sums over n in order (samples outermost: every sweep reads x and dy contiguously, straight
// from the values), then each channel's positions in order. A fixed order for any thread count. A tile holds at
// most kParamTile values because its callers keep HxW <= kShortRun.
inline int64_t short_run_tile_channels(const Problem& p) { return max_i64(1, kParamTile / p.HxW); }

template <class T, class S>
void short_run_param_grads(const Problem& p, int64_t tile, const S* dy, const S* x, const GroupGradCoeffs<T>* coeffs,
                           T* dweight, T* dbias) {
  const int64_t HxW = p.HxW, D = p.C / p.G, sample_len = p.C * HxW, per_tile = short_run_tile_channels(p);
  const int64_t c0 = tile * per_tile, c1 = min_i64(p.C, c0 + per_tile), j0 = c0 * HxW, width = (c1 - c0) * HxW;
  double dw[kParamTile], db[kParamTile];
  for (int64_t j = 0; j < width; ++j) dw[j] = db[j] = 0.0;
  for (int64_t n = 0; n < p.N; ++n) {
    const S* const dy_n = dy + n * sample_len;
    const S* const x_n = x + n * sample_len;
    const GroupGradCoeffs<T>* const k = coeffs + n * p.G;
    for (int64_t c = c0, g = c0 / D; c < c1; ++g) {  // a group's channels at a time: its coefficients are constants
      const int64_t end = min_i64(c1, (g + 1) * D);
      const double mean_hi = double(k[g].mean_hi), mean_lo = k[g].mean_lo, rstd = k[g].rstd;
      for (int64_t j = c * HxW; j < end * HxW; ++j) {
        const double d = double(widen(dy_n[j]));
        dw[j - j0] += (d * (double(widen(x_n[j])) - mean_hi) - mean_lo * d) * rstd;
        db[j - j0] += d;
      }
      c = end;
    }
  }
  for (int64_t c = c0; c < c1; ++c) {
    double w = 0.0, b = 0.0;
    for (int64_t i = 0; i < HxW; ++i) {
      w += dw[(c - c0) * HxW + i];
      b += db[(c - c0) * HxW + i];
    }
    if (dweight) dweight[c] = T(w);
    if (dbias) dbias[c] = T(b);
  }
}

template <class V, class S>
Status backward_short_runs(const Problem& p, const S* dy, const S* x, const typename V::Scalar* mean,
                           const typename V::Scalar* rstd, const typename V::Scalar* weight, S* dx,
                           typename V::Scalar* dweight, typename V::Scalar* dbias,
                           GroupGradCoeffs<typename V::Scalar>* coeffs, const SiluPass<V, S>* silu) {
  using T = typename V::Scalar;
  const int64_t C = p.C, G = p.G, HxW = p.HxW, L = C / G * HxW, sample_len = C * HxW;
  const bool spread_weight = weight && HxW > 1;
  Scratch<T> spread(spread_weight ? sample_len : 0);  // weight[c] at every position of channel c
  if (!spread.data) return kOutOfMemory;
  if (spread_weight) spread_over_positions(weight, C, HxW, spread.data);
  const T* const w_all = spread_weight ? spread.data : weight;
  // Fixed blocks of samples, whatever the thread count (each sweep's results do not depend on the split anyway).
  const int64_t block_rows = max_i64(1, kRowBlockElems / sample_len), nblocks = ceil_div(p.N, block_rows);
  auto groups_of = [&](int64_t k, auto&& body) {
    for (int64_t n = k * block_rows; n < min_i64(p.N, (k + 1) * block_rows); ++n)
      for (int64_t g = 0; g < G; ++g) body(n * G + g, n * sample_len + g * L, w_all ? w_all + g * L : nullptr);
  };
  auto block_coeffs = [&](int64_t k) {
    if (silu) silu->samples(k * block_rows, min_i64(p.N, (k + 1) * block_rows));  // dy (here dx) of the block
    groups_of(k, [&](int64_t ng, int64_t off, const T* w) {
      coeffs[ng] = row_group_grad_coeffs<V>(dy + off, x + off, L, double(mean[ng]), double(rstd[ng]), w);
    });
  };
  auto block_apply = [&](int64_t k) {
    groups_of(k, [&](int64_t ng, int64_t off, const T* w) {
      if (coeffs[ng].wide)
        wide_grad_apply<T>(dy + off, x + off, dx + off, L, 1, w, 1, coeffs[ng]);
      else
        row_group_grad_apply<V>(dy + off, x + off, dx + off, L, coeffs[ng], w);
    });
  };
  auto tile_params = [&](int64_t tile) { short_run_param_grads(p, tile, dy, x, coeffs, dweight, dbias); };
  const bool want_params = dweight || dbias;
  const int64_t tiles = want_params ? ceil_div(C, short_run_tile_channels(p)) : 0;
  const int nt = team_size(p.num_threads, 2 * p.N * sample_len, nblocks);
  if (nt == 1) {  // no OpenMP region at all: a tiny call must not pay for a team
    for (int64_t k = 0; k < nblocks; ++k) block_coeffs(k);
    for (int64_t tile = 0; tile < tiles; ++tile) tile_params(tile);
    for (int64_t k = 0; k < nblocks; ++k) block_apply(k);
    return kOk;
  }
#pragma omp parallel num_threads(nt)
  {
#pragma omp for schedule(static)
    for (int64_t k = 0; k < nblocks; ++k) block_coeffs(k);
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < tiles; ++tile) tile_params(tile);
#pragma omp for schedule(static)
    for (int64_t k = 0; k < nblocks; ++k) block_apply(k);
  }
  return kOk;
}

// ---------------------------------------------------------------------------------------------------------

// dx (same layout as dy and x; may be dy, or x itself without an activation), dweight and dbias (each may be
// null) from the saved mean and rstd of the forward (N*G values each, of the data type). With p.activation, dy is
// the gradient of the activation's output and bias (null: zeros) the forward's.
template <class V, class S>
Status group_norm_backward_impl(const Problem& p, const S* dy, const S* x, const typename V::Scalar* mean,
                                const typename V::Scalar* rstd, const typename V::Scalar* weight,
                                const typename V::Scalar* bias, S* dx, typename V::Scalar* dweight,
                                typename V::Scalar* dbias) {
  using T = typename V::Scalar;
  if (p.N == 0 || p.C == 0 || p.HxW == 0) {  // every sum is empty
    for (int64_t c = 0; c < p.C; ++c) {
      if (dweight) dweight[c] = 0;
      if (dbias) dbias[c] = 0;
    }
    return kOk;
  }
  const bool with_silu = p.activation == Activation::kSilu;
  Scratch<double> silu_mean_lo(with_silu ? p.N * p.G : 0);
  if (!silu_mean_lo.data) return kOutOfMemory;
  const SiluPass<V, S> silu_pass{p, dy, x, dx, mean, rstd, weight, bias, silu_mean_lo.data};
  const SiluPass<V, S>* silu = with_silu ? &silu_pass : nullptr;
  if (with_silu) dy = dx;  // the normalisation's gradient: written there by the SiLU pass, read in place
  Scratch<GroupGradCoeffs<T>> coeffs(p.N * p.G);
  if (!coeffs.data) return kOutOfMemory;
  if (p.HxW == 1 || (p.layout == Layout::kChannelsFirst && p.HxW <= kShortRun))  // HxW = 1: either layout
    return backward_short_runs<V>(p, dy, x, mean, rstd, weight, dx, dweight, dbias, coeffs.data, silu);
  const int64_t channels = p.N * p.C;
  Scratch<double> sums_block(3 * channels);
  if (!sums_block.data) return kOutOfMemory;
  const GradSums sums = grad_sums_in(sums_block.data, channels);
  if (p.layout == Layout::kChannelsFirst)
    return backward_channels_first<V>(p, dy, x, mean, rstd, weight, dx, dweight, dbias, sums, coeffs.data, silu);
  return backward_channels_last<V>(p, dy, x, mean, rstd, weight, dx, dweight, dbias, sums, coeffs.data, silu);
}

}  // namespace GROUPNORM_ISA
}  // namespace groupnorm
