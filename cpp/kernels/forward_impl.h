// forward_impl.h — GroupNorm forward, written once against Vec<T> and compiled once per ISA.
// Statistics: every fixed-size chunk of a group sums (x - K), (x - K)^2, K one sample of the group, in short
// vector runs flushed to double; chunk sums add up in a fixed order, so the result is bitwise identical for
// every thread count, and the shift keeps the variance free of cancellation. The mean is kept as a double
// plus its rounding error. Apply: y = (x - mean_hi) * s + t, with s = rstd*w and t = b - mean_lo*s carrying
// the low part of the mean, so a large offset costs no accuracy. A group whose sums leave T's range (squares
// that overflow or underflow it) is summed again in a wider type, and where its spread or 1/std leaves T's
// range it is applied in that type too (wide_group_stats): every finite input is normalised to the target.
// Included by cpp/kernels/isa/<isa>.cpp after defining GROUPNORM_ISA; everything lands in that namespace.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <utility>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "groupnorm/half.h"
#include "kernel_table.h"

#ifndef GROUPNORM_ISA
#error "define GROUPNORM_ISA (the ISA namespace) before including forward_impl.h"
#endif

namespace groupnorm {
namespace GROUPNORM_ISA {

// Blocking: fixed by the shape alone, never by the thread count.
constexpr int64_t kChunkMinElems = 16384;  // small enough to stay in L2, large enough to amortise a task
constexpr int64_t kChunksMax = 64;         // per group (channels-first) or per sample (channels-last)
constexpr int kFlushIters = 16;            // vector iterations summed in T before flushing into double
constexpr int64_t kSerialElems = 32768;    // below this per thread, a thread costs more than it saves
constexpr int64_t kLineBytes = 64;         // a cache line
constexpr int64_t kL1TileBytes = 16384;    // rows of a channels-last block kept in L1 across channel tiles
constexpr int64_t kRowBlockElems = 4096;   // (N, C) input: consecutive groups summed, then applied, while in L1
constexpr int64_t kShortRun = 16;          // channels-first runs about this short: too short for per-channel work
constexpr int64_t kL2ResidentBytes = 1 << 20;  // a thread's data this small stays in L2 between two passes

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max_i64(int64_t a, int64_t b) { return a < b ? b : a; }

// Mean (as mean + mean_lo, the second its rounding error) and 1/sqrt(var + eps) of one group; `wide` marks a
// group whose values the apply step must take in Wide<T> (wide_group_stats).
struct GroupStats {
  double mean;
  double mean_lo;
  double rstd;
  bool wide;
};

// Mean and shifted variance of `count` values (inv_count = 1/count) from s1 = sum(x - shift) and
// s2 = sum((x - shift)^2), with var + eps left in `rstd` for finish_rstd. The variance is clamped at 0 (a NaN
// stays NaN); TwoSum recovers the rounding error of shift + s1/count.
inline GroupStats group_moments(double count, double inv_count, double shift, double s1, double s2, double eps) {
  if (count == 0) return {__builtin_nan(""), 0.0, __builtin_nan(""), false};
  const double q = s1 * inv_count;
  const double mean = shift + q;
  const double q_part = mean - shift;
  const double mean_lo = (shift - (mean - q_part)) + (q - q_part);
  double var = (s2 - s1 * q) * inv_count;
  if (var < 0.0) var = 0.0;
  return {mean, mean_lo, var + eps, false};
}

// 1/sqrt(var + eps) from what group_moments left in rstd. Kept apart so that a loop over many small groups
// runs their square roots and divisions back to back, overlapped, not each behind its group's sums.
inline double finish_rstd(double var_eps) { return 1.0 / __builtin_sqrt(var_eps); }

// Statistics of one group: group_moments, then finish_rstd.
inline GroupStats group_stats(double count, double inv_count, double shift, double s1, double s2, double eps) {
  GroupStats s = group_moments(count, inv_count, shift, s1, s2, eps);
  s.rstd = finish_rstd(s.rstd);
  return s;
}

// The middle one of three values: the shift of a group is the median of three of its samples, so one
// outlier (a zero-padded border pixel, say) cannot become the shift.
template <class T>
T median3(T a, T b, T c) {
  const T lo = a < b ? a : b, hi = a < b ? b : a;
  return c < lo ? lo : (hi < c ? hi : c);
}

// median3 of a run's first, middle and last values x[0], x[n / 2], x[n - 1], in T.
template <class T, class S>
T run_median3(const S* x, int64_t n) {
  return median3(T(widen(x[0])), T(widen(x[n / 2])), T(widen(x[n - 1])));
}

// True when the shift lies more than two standard deviations from the mean: the sums in T then carry too
// much cancellation for the float32 target, and the group is summed again around its mean (rare: the
// median of three samples is that far off for well under 1% of Gaussian groups). False for NaN.
inline bool shift_too_far(double inv_count, double s1, double s2) {
  const double q = s1 * inv_count;
  return q * q > 4.0 * ((s2 - s1 * q) * inv_count);
}

// True when the sums in T left its normal range: float32 deviations beyond ~1e18 or below ~1e-15 (float64:
// beyond ~1e153, below ~1e-135), an infinity or a NaN in the group, or both sums exactly 0 (a constant group,
// or one whose every square underflowed).
template <class T>
bool sums_out_of_range(double inv_count, double s1, double s2) {
  return !(s2 < __builtin_inf() && s1 - s1 == 0.0) || s2 * inv_count < (sizeof(T) == 4 ? 0x1p-100 : 0x1p-900);
}

// The float sums of a group need a second look (refine_sums): the shift lies more than two standard
// deviations from the mean, or the sums left T's range. Rare, and cheap to test.
template <class T>
bool needs_refine(double inv_count, double s1, double s2) {
  return sums_out_of_range<T>(inv_count, s1, s2) || shift_too_far(inv_count, s1, s2);
}

// A type whose range holds the squares and sums of every finite T, with more precision than T: the
// statistics, and where needed the apply, of groups the sums in T cannot hold.
template <class T>
struct WideOf {
  using type = double;
};
template <>
struct WideOf<double> {
  using type = long double;  // x86: 80-bit extended, 15-bit exponent; aarch64 Linux: binary128
};
template <class T>
using Wide = typename WideOf<T>::type;

inline double wide_sqrt(double v) { return __builtin_sqrt(v); }
inline long double wide_sqrt(long double v) { return __builtin_sqrtl(v); }
inline double wide_exp(double v) { return __builtin_exp(v); }
inline long double wide_exp(long double v) { return __builtin_expl(v); }

// Whether any value of the runs x[0, n) differs from shift: a constant group and one whose every square
// underflowed T both sum to exactly 0.
template <class V, class S>
bool run_differs(const S* x, int64_t n, typename V::Scalar shift) {
  using T = typename V::Scalar;
  constexpr int64_t W = V::kWidth;
  const V shift_v = V::broadcast(shift);
  V far = V::zero();  // lane-wise max |x - shift|
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const V d = V::load(x + i) - shift_v;
    far = max(far, max(d, V::zero() - d));
  }
  if (i < n) {
    const V d = V::load_tail(x + i, n - i, shift) - shift_v;
    far = max(far, max(d, V::zero() - d));
  }
  alignas(64) T lanes[W];
  V::store(lanes, far);
  for (int64_t k = 0; k < W; ++k)
    if (lanes[k] != T(0)) return true;
  return false;
}

// The second look at a group's sums (needs_refine): a shift far from the mean is replaced by the mean and the
// group summed again, resum(shift, s1, s2); a group whose sums leave T's range, or that sums to exactly 0
// without being constant, needs its statistics from wide_group_stats: returns true then. visit(f) hands the
// group to f(run, length) one contiguous run at a time. Out of line: the common path never comes here.
template <class V, class Resum, class Visit>
__attribute__((noinline)) bool refine_sums(double inv_count, typename V::Scalar& shift, double& s1, double& s2,
                                           Resum resum, Visit visit) {
  using T = typename V::Scalar;
  if (shift_too_far(inv_count, s1, s2)) {
    shift = T(double(shift) + s1 * inv_count);
    resum(shift, s1, s2);
  }
  if (!sums_out_of_range<T>(inv_count, s1, s2)) return false;
  if (s1 != 0.0 || s2 != 0.0) return true;
  bool differs = false;
  visit([&](const auto* run, int64_t n) { differs = differs || run_differs<V>(run, n, shift); });
  return differs;
}

// Statistics of a group in Wide<T>, two passes over visit(f) as in refine_sums: the sum of x - shift gives the
// mean, then the sums of (x - mean) and its squares the variance. `wide` is set when 1/std or the group's
// spread leaves T's range (std beyond 2^64 in float32, 2^512 in float64), so the apply must be wide too.
template <class T, class Visit>
__attribute__((noinline)) GroupStats wide_group_stats(double count, T shift, double eps, Visit visit) {
  using Wd = Wide<T>;
  const Wd n = Wd(count), k = Wd(shift);
  Wd s1 = 0;
  visit([&](const auto* run, int64_t len) {
    for (int64_t i = 0; i < len; ++i) s1 += Wd(widen(run[i])) - k;
  });
  const Wd mean = k + s1 / n;
  Wd m1 = 0, m2 = 0;
  if (mean - mean == 0) {  // an infinity or a NaN in the group leaves every output NaN
    visit([&](const auto* run, int64_t len) {
      for (int64_t i = 0; i < len; ++i) {
        const Wd d = Wd(widen(run[i])) - mean;
        m1 += d;
        m2 += d * d;
      }
    });
  } else {
    m2 = mean - mean;
  }
  Wd var = (m2 - m1 * m1 / n) / n;
  if (var < 0) var = 0;
  const double mean_hi = double(mean);
  const double wide_std = sizeof(T) == 4 ? 0x1p64 : 0x1p512;
  // Wide both ways: with eps = 0, float32 values of ~1e-40 give 1/std ~ 1e40, beyond float, whose apply made
  // every output NaN (inf * 0) where the reference is of order 1.
  const Wd var_eps = var + Wd(eps);
  return {mean_hi, double(mean - Wd(mean_hi)), double(Wd(1) / wide_sqrt(var_eps)),
          var > Wd(wide_std) * Wd(wide_std) || var_eps < Wd(1) / (Wd(wide_std) * Wd(wide_std))};
}

inline void put_wide(float* p, double v) { *p = float(v); }
inline void put_wide(double* p, long double v) { *p = double(v); }
inline void put_wide(Half* p, double v) { *p = narrow_half(float(v)); }
inline void put_wide(BFloat16* p, double v) { *p = narrow_bfloat16(float(v)); }

// The apply step of a wide group (GroupStats::wide) for one channel: n values `stride` apart, in Wide<T>.
template <class T, bool kSilu, class S>
__attribute__((noinline)) void wide_apply_run(const S* x, S* y, int64_t n, int64_t stride, const GroupStats& s,
                                              const T* weight, const T* bias, int64_t c) {
  using Wd = Wide<T>;
  // The mean's two parts are subtracted one after the other: their sum rounded to Wd (64 bits for long
  // double) would lose what mean_lo carries when the spread is far below the offset.
  const Wd mean_hi = Wd(s.mean), mean_lo = Wd(s.mean_lo);
  const Wd scale = Wd(s.rstd) * (weight ? Wd(weight[c]) : Wd(1));
  const Wd b = bias ? Wd(bias[c]) : Wd(0);
  for (int64_t i = 0; i < n; ++i) {
    Wd v = ((Wd(widen(x[i * stride])) - mean_hi) - mean_lo) * scale + b;
    if (kSilu) v = v / (Wd(1) + wide_exp(-v));
    put_wide(y + i * stride, v);
  }
}

// Sums of (x - shift) and (x - shift)^2 over a contiguous run x[0, n).
struct ShiftedSums {
  double s1;
  double s2;
};

// A run of at most one vector, inline: a tiny group (a row of an (N, C) input, say) pays no call and no stack
// frame, and its at most W terms are summed in T (as run_shifted_sums sums up to 2*kFlushIters terms a lane).
template <class V, class S>
inline ShiftedSums short_run_shifted_sums(const S* x, int64_t n, typename V::Scalar shift) {
  const V d = V::load_tail(x, n, shift) - V::broadcast(shift);  // filled lanes give d = 0
  return {double(V::sum_lanes(d)), double(V::sum_lanes(d * d))};
}

// With kPlain, the shift is 0 and not subtracted (plain_first_look).
template <class V, bool kPlain = false, class S>
ShiftedSums run_shifted_sums(const S* x, int64_t n, typename V::Scalar shift) {
  constexpr int64_t W = V::kWidth;
  constexpr int64_t kBlock = 2 * W * kFlushIters;
  const V shift_v = V::broadcast(shift);
  auto diff = [&](const V& v) {
    if constexpr (kPlain) return v;
    return v - shift_v;
  };
  typename V::Acc s1 = V::acc_zero(), s2 = V::acc_zero();
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    V sum_a = V::zero(), sq_a = V::zero(), sum_b = V::zero(), sq_b = V::zero();
    // Unrolled twice, not all 16 times: fully unrolled, GCC hoisted the loads and spilled their differences to the
    // stack (AVX2 and AVX-512 alike); NCHW forwards at 0.94-0.99x the time on AVX2 without the spills.
#pragma GCC unroll 2
    for (int64_t k = 0; k < kBlock; k += 2 * W) {
      V la, lb;
      load_split(x + i + k, la, lb);  // any lane order: every lane is summed
      const V da = diff(la), db = diff(lb);
      sum_a = sum_a + da;
      sq_a = fma(da, da, sq_a);
      sum_b = sum_b + db;
      sq_b = fma(db, db, sq_b);
    }
    V::acc_add(s1, sum_a + sum_b);
    V::acc_add(s2, sq_a + sq_b);
  }
  V sum = V::zero(), sq = V::zero();
  for (; i + W <= n; i += W) {
    const V d = diff(V::load(x + i));
    sum = sum + d;
    sq = fma(d, d, sq);
  }
  if (i < n) {
    const V d = diff(V::load_tail(x + i, n - i, shift));  // filled lanes give d = 0
    sum = sum + d;
    sq = fma(d, d, sq);
  }
  V::acc_add(s1, sum);
  V::acc_add(s2, sq);
  return {V::acc_sum(s1), V::acc_sum(s2)};
}

// The sums of n values a row over `rows` rows `stride` apart (one group of a channels-last sample), vectorised
// across the row's values, with up to 2*kFlushIters terms a lane summed in T before each flush into the
// lane-wise double accumulators (as run_shifted_sums). The second look at a channels-last group (refine_sums):
// a call to run_shifted_sums a row took 41 us for one group of [1,320,64,64] bfloat16, a third of the whole call.
template <class V, class S>
ShiftedSums strided_shifted_sums(const S* x, int64_t n, int64_t stride, int64_t rows, typename V::Scalar shift) {
  constexpr int64_t W = V::kWidth;
  const V shift_v = V::broadcast(shift);
  const int64_t vectors = ceil_div(n, W), rows_per_flush = max_i64(1, 2 * kFlushIters / vectors);
  typename V::Acc s1 = V::acc_zero(), s2 = V::acc_zero();
  for (int64_t rb = 0; rb < rows; rb += rows_per_flush) {
    V sum = V::zero(), sq = V::zero();
    for (int64_t r = rb; r < min_i64(rows, rb + rows_per_flush); ++r) {
      const S* row = x + r * stride;
      for (int64_t i = 0; i < n; i += W) {
        const V d = (i + W <= n ? V::load(row + i) : V::load_tail(row + i, n - i, shift)) - shift_v;  // fill: 0
        sum = sum + d;
        sq = fma(d, d, sq);
      }
    }
    V::acc_add(s1, sum);
    V::acc_add(s2, sq);
  }
  return {V::acc_sum(s1), V::acc_sum(s2)};
}

// The first look at a channels-first group of 16-bit data may sum x and x*x as they are (shift 0): no subtraction,
// and for bfloat16 where the level has AVX512_BF16, vdpbf16ps in place of widening (kDotSums). In a
// micro-benchmark from L1, a vector's shifted sums took 0.82 ns in float16, plain 0.54 ns, bfloat16 by vdpbf16ps
// 0.19 ns; whole forwards, bench/NOTES.md (twenty-fourth session). A shift of 0 is judged as any other
// (needs_refine): where the mean lies more than two standard deviations from it, or the sums left float's range
// (vdpbf16ps's DAZ/FTZ included), the group is summed again the exact way, around its mean. So that such groups
// rarely pay for two looks, 0 is the shift only where the group's three samples (run_median3's) straddle it or lie
// nearer to it than their range is wide (plain_first_look); elsewhere their median is, as for float32 and float64,
// whose forward is bound by memory.
template <class S>
constexpr bool kPlainSums = std::is_same<S, Half>::value || std::is_same<S, BFloat16>::value;

template <class V, class S>
constexpr bool kDotSums =
#ifdef __AVX512BF16__
    std::is_same<S, BFloat16>::value && std::is_same<typename V::Scalar, float>::value;
#else
    false;
#endif

// The first look's shift of a run of n >= 1 values: 0 where its first, middle and last values, a <= b <= c, have
// |b| <= c - a (kPlainSums only), else b (run_median3). A NaN among them gives b.
template <class T, class S>
T plain_first_look(const S* x, int64_t n) {
  const T a = T(widen(x[0])), b = T(widen(x[n / 2])), c = T(widen(x[n - 1]));
  const T median = median3(a, b, c);
  if constexpr (kPlainSums<S>) {
    const T lo = a < b ? (a < c ? a : c) : (b < c ? b : c), hi = a < b ? (b < c ? c : b) : (a < c ? c : a);
    if (median <= hi - lo && -median <= hi - lo) return T(0);
  }
  return median;
}

// A chunk's sums for the first look at its group, around `shift` (plain_first_look's).
template <class V, class S>
ShiftedSums first_look_sums(const S* x, int64_t n, typename V::Scalar shift) {
  if constexpr (kPlainSums<S>) {
    if (shift == 0) {
      if constexpr (kDotSums<V, S>) {
        typename V::Acc s1 = V::acc_zero(), s2 = V::acc_zero();
        V::dot_sums_bf16(x, n, s1, s2);
        return {V::acc_sum(s1), V::acc_sum(s2)};
      }
      return run_shifted_sums<V, true>(x, n, shift);
    }
  }
  return run_shifted_sums<V>(x, n, shift);
}

// The sums of a run of any length: one vector or less inline (short_run_shifted_sums), longer through
// run_shifted_sums.
template <class V, class S>
inline ShiftedSums any_run_shifted_sums(const S* x, int64_t n, typename V::Scalar shift) {
  return n <= V::kWidth ? short_run_shifted_sums<V>(x, n, shift) : run_shifted_sums<V>(x, n, shift);
}

// 1 + exp(-y), the SiLU's denominator (forward and backward): exp by Cody-Waite reduction, n = round(-y / ln 2) and
// r = -y - n ln 2 with |r| <= ln2 / 2, then a polynomial in r good to about an ulp of T (a Chebyshev fit of degree 6
// for float, 11 for double), times 2^n, plus 1, in one fma. The rounding is an add of kMagic = 1.5 * 2^m + bias (m
// mantissa bits): the sum's low mantissa bits hold n + bias, and a shift of its bits puts them in a float's exponent
// field (pow2_of_rounded): no rounding, conversion or integer add. y is clamped to +-87 (double: +-708) so that 2^n
// stays normal; a NaN y comes out of the clamp as a number (the caller's y carries the NaN on). Since x = -y, r is
// taken negated, r' = y + n ln 2, and the polynomial's odd coefficients with their signs flipped.
// Always inlined, as activate and silu_derivative (backward_impl.h) are: called out of line from the apply loops,
// every vector paid a call, its constants loaded again and the caller's vector registers spilled around it (no ymm
// register is callee-saved), and the fused SiLU took 3-4x the forward without it (NOTES, fifteenth session).
template <class V>
__attribute__((always_inline)) inline V one_plus_exp_neg(V y) {
  using T = typename V::Scalar;
  constexpr bool kF32 = sizeof(T) == 4;
  y = min(max(y, V::broadcast(kF32 ? T(-87.0) : T(-708.0))), V::broadcast(kF32 ? T(87.0) : T(708.0)));
  const V magic = V::broadcast(kF32 ? T(12582912.0 + 127.0) : T(6755399441055744.0 + 1023.0));
  const V t = fma(y, V::broadcast(T(-1.4426950408889634)), magic);  // n + magic
  const V n = t - magic;
  V r = fma(n, V::broadcast(T(0.693145751953125)), y);  // ln 2 split: hi has few bits, so n*hi is exact
  r = fma(n, V::broadcast(T(1.4286068203094172321e-6)), r);
  // Coefficients of exp(-r) on |r| <= ln2/2 + 1e-4 (mpmath.chebyfit): c_k (-1)^k for exp's c_k.
  static constexpr double kF32Coeffs[] = {1.0, -1.0000000377816202, 0.5000000047199452, -0.16666415224265796,
                                          0.041666352534085764, -0.0083751505698369708, 0.0013941138623396756};
  static constexpr double kF64Coeffs[] = {1.0,
                                          -1.0,
                                          0.50000000000000184387,
                                          -0.16666666666666680847,
                                          0.041666666666487682682,
                                          -0.0083333333333195688662,
                                          0.0013888888952424725872,
                                          -0.00019841269890131664129,
                                          0.000024801485364665952492,
                                          -2.7557240828098963687e-6,
                                          2.7632683164907009138e-7,
                                          -2.5110071076352930923e-8};
  constexpr int kDegree = kF32 ? 6 : 11;
  const double* const c = kF32 ? kF32Coeffs : kF64Coeffs;
  V p = V::broadcast(T(c[kDegree]));
#pragma GCC unroll 12
  for (int k = kDegree - 1; k >= 0; --k) p = fma(p, r, V::broadcast(T(c[k])));
  return fma(p, pow2_of_rounded(t), V::broadcast(T(1)));
}

// y * sigmoid(y), written as y / (1 + exp(-y)): a NaN stays NaN, large |y| give y and -0.
template <class V, bool kSilu>
__attribute__((always_inline)) inline V activate(V y) {
  if constexpr (kSilu) {
    return y / one_plus_exp_neg(y);
  } else {
    return y;
  }
}

// Stores a to p[0, W) and b to p[W, 2W): V::store_pair where V has one for S (bfloat16 on x86: one narrowing, or
// one pack, for both), else two stores. The int / long argument makes the first overload win where it exists.
// kInputNaNs false: no value carries a NaN from the input (vec/avx2.h, bf16_rounded; values_clean says when).
// These wrappers (and load_split's below), like the vec headers' per-vector members under them, are always inlined:
// left to itself GCC put VecF32::store_split out of line in one of apply_pairs' two loops once split_bits had its
// subnormal branch, a call per vector pair with the coefficients spilled around it (bfloat16 NCHW forward at 1.8x
// the time). tests/test_cpp_kernels.py, test_vector_helpers_inlined, checks the release build's symbols for it.
template <class V, bool kInputNaNs, class S>
__attribute__((always_inline)) inline auto store_pair_of(S* p, V a, V b, int)
    -> decltype(V::template store_pair<kInputNaNs>(p, a, b)) {
  V::template store_pair<kInputNaNs>(p, a, b);
}
template <class V, bool kInputNaNs, class S>
__attribute__((always_inline)) inline void store_pair_of(S* p, V a, V b, long) {
  V::store(p, a);
  V::store(p + V::kWidth, b);
}
template <class V, bool kInputNaNs = true, class S>
__attribute__((always_inline)) inline void store_pair(S* p, V a, V b) {
  store_pair_of<V, kInputNaNs>(p, a, b, 0);
}

// v to p[0, W): non-temporal with kStream.
template <class V, bool kStream, class S>
__attribute__((always_inline)) inline void store_vector(S* p, const V& v) {
  if (kStream)
    V::store_stream(p, v);
  else
    V::store(p, v);
}

// a to p[0, W) and b to p[W, 2W): non-temporal with kStream, else as one pair (store_pair).
template <class V, bool kStream, bool kInputNaNs = true, class S>
__attribute__((always_inline)) inline void store_two(S* p, const V& a, const V& b) {
  if (kStream) {
    V::store_stream(p, a);
    V::store_stream(p + V::kWidth, b);
  } else {
    store_pair<V, kInputNaNs>(p, a, b);
  }
}

// Two vectors' worth of values p[0, 2W) in any lane order, for lane-wise work with one coefficient for every lane
// (a channels-first run): V::load_split where V has one for S (bfloat16 on AVX2 and AVX-512: the values split by
// parity, with no widening shuffle), else p[0, W) to a and p[W, 2W) to b. store_split puts them back in that order.
template <class V, class S>
__attribute__((always_inline)) inline auto load_split_of(const S* p, V& a, V& b, int)
    -> decltype(V::load_split(p, a, b)) {
  V::load_split(p, a, b);
}
template <class V, class S>
__attribute__((always_inline)) inline void load_split_of(const S* p, V& a, V& b, long) {
  a = V::load(p);
  b = V::load(p + V::kWidth);
}
template <class V, class S>
__attribute__((always_inline)) inline void load_split(const S* p, V& a, V& b) {
  load_split_of<V>(p, a, b, 0);
}
template <class V, bool kStream, bool kInputNaNs, class S>
__attribute__((always_inline)) inline auto store_split_of(S* p, V a, V b, int)
    -> decltype(V::template store_split<kInputNaNs>(p, a, b)) {
  if (kStream)
    V::template store_split_stream<kInputNaNs>(p, a, b);
  else
    V::template store_split<kInputNaNs>(p, a, b);
}
template <class V, bool kStream, bool kInputNaNs, class S>
__attribute__((always_inline)) inline void store_split_of(S* p, V a, V b, long) {
  store_two<V, kStream, kInputNaNs>(p, a, b);
}
template <class V, bool kStream, bool kInputNaNs = true, class S>
__attribute__((always_inline)) inline void store_split(S* p, V a, V b) {
  store_split_of<V, kStream, kInputNaNs>(p, a, b, 0);
}

// Whether V has load_split for S (its fallback is two plain loads).
template <class V, class S, class = void>
struct HasSplit : std::false_type {};
template <class V, class S>
struct HasSplit<V, S, std::void_t<decltype(V::load_split(static_cast<const S*>(nullptr), std::declval<V&>(),
                                                         std::declval<V&>()))>> : std::true_type {};

// Reorders a[0, n / (2W) * 2W) in blocks of 2W, each block's even entries first, then its odd ones: per-channel
// coefficients in load_split's lane order, so that the two vectors at c hold those of the even and of the odd
// channels of [c, c + 2W). Entries past the last whole block stay as they are.
template <int64_t W, class T>
void split_order(T* a, int64_t n) {
  T block[2 * W];
  for (int64_t c = 0; c + 2 * W <= n; c += 2 * W) {
    for (int64_t j = 0; j < W; ++j) {
      block[j] = a[c + 2 * j];
      block[W + j] = a[c + 2 * j + 1];
    }
    for (int64_t j = 0; j < 2 * W; ++j) a[c + j] = block[j];
  }
}

// Whether values computed from these coefficients and the data they came from can carry no NaN from the input.
// Each coefficient is NaN or infinite when the group's data holds a NaN or an infinity (the sums run through every
// element) or a parameter is NaN, so finite coefficients leave only NaNs that arithmetic makes: the default quiet
// NaN, which bfloat16's rounding add keeps quiet (vec/avx2.h, bf16_rounded).
template <class T>
inline bool values_clean(std::initializer_list<T> coefficients) {
  for (T c : coefficients)
    if (!std::isfinite(c)) return false;
  return true;
}
// The same for per-channel coefficient arrays a[0, n) (a sample's, channels-last).
template <class T>
inline bool values_clean(std::initializer_list<const T*> arrays, int64_t n) {
  for (const T* a : arrays)
    for (int64_t i = 0; i < n; ++i)
      if (!std::isfinite(a[i])) return false;
  return true;
}

// f(std::true_type) when values may carry the input's NaNs, f(std::false_type) when `clean` (values_clean) and S
// is bfloat16, whose narrowing has a cheaper path for clean values; other S take one instantiation.
template <class S, class F>
__attribute__((always_inline)) inline void with_input_nans(bool clean, F f) {
  if constexpr (std::is_same<S, BFloat16>::value) {
    if (clean) {
      f(std::false_type{});
      return;
    }
  }
  f(std::true_type{});
}

// Per-channel affine coefficients of the apply step: y = (x - mean_hi) * scale + shift.
template <class T>
struct Coeffs {
  T mean_hi;
  T scale;
  T shift;
};

template <class T, class S>
Coeffs<T> channel_coeffs(const GroupStats& s, const S* weight, const S* bias, int64_t c) {
  const double scale = s.rstd * (weight ? double(weight[c]) : 1.0);
  const double b = bias ? double(bias[c]) : 0.0;
  const T mean_hi = T(s.mean);
  const double mean_lo = (s.mean - double(mean_hi)) + s.mean_lo;
  return {mean_hi, T(scale), T(b - mean_lo * scale)};
}

// Whether an apply pass from x to y should run backwards. A load that follows a store to the same offset
// within a 4 KiB page (on some CPUs, a 1 MiB region) waits for that store to resolve, though the two do not
// overlap ("4K aliasing"). A forward pass meets that on every vector when y starts a little after x modulo
// 4 KiB, as an out= buffer allocated just after its input does (x, then np.empty_like(x), 16 bytes apart mod
// 4 KiB): [8,64,4096] float16 took 3x as long as into a buffer elsewhere (1 thread: 1125 against 371 us), and
// [1,320,64,64] bfloat16 channels-last 2.6x. Backwards, every load comes after stores to higher offsets only;
// with aligned stores it runs as fast as forwards (a misaligned one costs a third more backwards). y a little
// before x (or y == x) is safe forwards. The CPU these were measured on aliases modulo 1 MiB; 4 KiB covers it.
inline bool apply_backwards(const void* x, const void* y) {
  const uintptr_t lead = (reinterpret_cast<uintptr_t>(y) - reinterpret_cast<uintptr_t>(x)) % 4096;
  return lead != 0 && lead < 2048;
}

// apply_run's vector pairs [begin, end) of x -> y, from the last when `backwards`, their lanes in any order
// (load_split). A function with its coefficients as values: as a lambda of apply_run, GCC left it out of line and
// reloaded them and the pointers from the closure after every store.
template <class V, bool kSilu, bool kStream, bool kInputNaNs, class S>
__attribute__((always_inline)) inline void apply_pairs(const S* x, S* y, int64_t begin, int64_t end,
                                                       bool backwards, V mean_hi, V scale, V shift) {
  constexpr int64_t W = V::kWidth;
  auto pair = [&](int64_t at) __attribute__((always_inline)) {  // with the SiLU GCC left it out of line (bfloat16)
    V a, b;
    load_split(x + at, a, b);
    store_split<V, kStream, kInputNaNs>(y + at, activate<V, kSilu>(fma(a - mean_hi, scale, shift)),
                                        activate<V, kSilu>(fma(b - mean_hi, scale, shift)));
  };
  if (backwards) {
    for (int64_t at = end - 2 * W; at >= begin; at -= 2 * W) pair(at);
  } else {
    for (int64_t at = begin; at < end; at += 2 * W) pair(at);
  }
}

// Applies one channel's coefficients to a contiguous run x[0, n) -> y[0, n), from the end when `backwards`
// (apply_backwards). With kStream, the aligned middle of the run goes out with non-temporal stores: for outputs
// larger than the cache they skip the read-for-ownership of y, a third of the traffic.
template <class V, class S, bool kSilu, bool kStream>
void apply_run(const S* x, S* y, int64_t n, Coeffs<typename V::Scalar> k, bool backwards) {
  using T = typename V::Scalar;
  constexpr int64_t W = V::kWidth;
  const V mean_hi = V::broadcast(k.mean_hi), scale = V::broadcast(k.scale), shift = V::broadcast(k.shift);
  auto value = [&](const V& v) { return activate<V, kSilu>(fma(v - mean_hi, scale, shift)); };
  auto store = [&](S* to, const V& v) { store_vector<V, kStream>(to, v); };
  // The vector pairs [begin, end) (from the last when `backwards`), their lanes in any order (load_split).
  auto pairs = [&](int64_t begin, int64_t end) __attribute__((always_inline)) {
    with_input_nans<S>(values_clean({k.mean_hi, k.scale, k.shift}), [&](auto input_nans) __attribute__((always_inline)) {
      apply_pairs<V, kSilu, kStream, decltype(input_nans)::value>(x, y, begin, end, backwards, mean_hi, scale, shift);
    });
  };
  // Elements before y's first vector boundary, stored first (masked) so that the rest are aligned: non-temporal
  // stores need it, and backwards a store split over two lines costs a third more (forwards, a few percent).
  int64_t head = 0;
  if (kStream || backwards) {
    const int64_t misaligned = int64_t(reinterpret_cast<uintptr_t>(y) % (W * sizeof(S))) / int64_t(sizeof(S));
    head = min_i64(n, misaligned ? W - misaligned : 0);
  }
  if (backwards) {
    const int64_t body_end = head + (n - head) / W * W;
    const int64_t pairs_begin = body_end - (body_end - head) / (2 * W) * 2 * W;
    if (body_end < n) V::store_tail(y + body_end, value(V::load_tail(x + body_end, n - body_end, T(0))), n - body_end);
    pairs(pairs_begin, body_end);
    if (pairs_begin > head) store(y + head, value(V::load(x + head)));  // one vector between head and the pairs
    if (head > 0) V::store_tail(y, value(V::load_tail(x, head, T(0))), head);
    return;
  }
  if (head > 0) V::store_tail(y, value(V::load_tail(x, head, T(0))), head);
  const int64_t pairs_end = head + (n - head) / (2 * W) * 2 * W;
  pairs(head, pairs_end);
  int64_t i = pairs_end;
  if (i + W <= n) {
    store(y + i, value(V::load(x + i)));
    i += W;
  }
  if (i < n) V::store_tail(y + i, value(V::load_tail(x + i, n - i, T(0))), n - i);
}

// Scratch owned by one call or one thread: on the stack when small (tiny calls pay no malloc), else from
// malloc/free; no std template is instantiated in an ISA TU.
template <class E>
struct Scratch {
  static constexpr int64_t kInlineBytes = 4096;
  E* data = nullptr;
  explicit Scratch(int64_t count) {
    const size_t bytes = sizeof(E) * size_t(max_i64(count, 1));
    data = bytes <= size_t(kInlineBytes) ? reinterpret_cast<E*>(inline_buffer)
                                         : static_cast<E*>(std::malloc(bytes));
  }
  ~Scratch() {
    if (data != reinterpret_cast<E*>(inline_buffer)) std::free(data);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

 private:
  alignas(64) unsigned char inline_buffer[kInlineBytes];
};

// Non-temporal stores pay off once input and output together overflow the last-level cache.
inline bool streams_output(const Problem& p, size_t elem_bytes) {
  const double bytes = 2.0 * double(elem_bytes) * double(p.N) * double(p.C) * double(p.HxW);
  return p.stream_threshold_bytes > 0 && bytes > double(p.stream_threshold_bytes);
}

// The calling OpenMP thread's share [begin, end) of `count` work items split evenly over its team.
struct ThreadRange {
  int64_t begin;
  int64_t end;
};

inline ThreadRange thread_range(int64_t count) {
#ifdef _OPENMP
  const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
  const int64_t t = 0, nt = 1;
#endif
  const int64_t per = count / nt, extra = count % nt;
  const int64_t begin = t * per + min_i64(t, extra);
  return {begin, begin + per + (t < extra ? 1 : 0)};
}

inline int team_size(int requested, int64_t total_elems, int64_t work_items) {
  int64_t nt = requested < 1 ? 1 : requested;
  nt = min_i64(nt, max_i64(1, total_elems / kSerialElems));
  nt = min_i64(nt, max_i64(1, work_items));
  return int(nt);
}

template <class T>
void store_group_stats(const GroupStats* stats, int64_t count, T* mean_out, T* rstd_out) {
  for (int64_t i = 0; i < count; ++i) {
    if (mean_out) mean_out[i] = T(stats[i].mean);
    if (rstd_out) rstd_out[i] = T(stats[i].rstd);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Channels-first (NCHW): a group is one contiguous run of D*HxW elements, cut into fixed chunks.

template <class V, class S, bool kSilu>
Status forward_channels_first(const Problem& p, const S* x, const typename V::Scalar* weight,
                              const typename V::Scalar* bias, S* y, GroupStats* stats) {
  using T = typename V::Scalar;
  const int64_t D = p.C / p.G, group_len = D * p.HxW, groups = p.N * p.G;
  const int64_t chunk_len = ceil_div(max_i64(ceil_div(group_len, kChunksMax), kChunkMinElems), 64) * 64;
  const int64_t nchunks = ceil_div(group_len, chunk_len);
  const int64_t units = groups * nchunks;
  Scratch<ShiftedSums> partial(units);
  if (!partial.data) return kOutOfMemory;
  const bool stream = streams_output(p, sizeof(S)), backwards = apply_backwards(x, y);
  auto group_shift = [&](const S* group) { return plain_first_look<T>(group, group_len); };

  auto chunk_moments = [&](int64_t unit) {
    const int64_t ng = unit / nchunks, k = unit % nchunks;
    const int64_t begin = k * chunk_len;
    const S* group = x + ng * group_len;
    partial.data[unit] = first_look_sums<V>(group + begin, min_i64(chunk_len, group_len - begin),
                                            group_shift(group));
  };
  const double inv_group_len = 1.0 / double(group_len);
  // The second look at a group's sums (rare), out of line so the common path stays small.
  auto refined_stats = [&](const S* group, T shift, double s1, double s2) __attribute__((noinline)) {
    auto visit = [&](auto&& f) { f(group, group_len); };
    auto resum = [&](T k, double& r1, double& r2) {
      r1 = r2 = 0.0;
      for (int64_t begin = 0; begin < group_len; begin += chunk_len) {
        const ShiftedSums sums = run_shifted_sums<V>(group + begin, min_i64(chunk_len, group_len - begin), k);
        r1 += sums.s1;
        r2 += sums.s2;
      }
    };
    if (refine_sums<V>(inv_group_len, shift, s1, s2, resum, visit))
      return wide_group_stats(double(group_len), shift, p.eps, visit);
    return group_stats(double(group_len), inv_group_len, double(shift), s1, s2, p.eps);
  };
  auto group_finish = [&](int64_t ng) {
    const S* group = x + ng * group_len;
    const T shift = group_shift(group);
    double s1 = 0.0, s2 = 0.0;
    for (int64_t k = 0; k < nchunks; ++k) {
      s1 += partial.data[ng * nchunks + k].s1;
      s2 += partial.data[ng * nchunks + k].s2;
    }
    stats[ng] = needs_refine<T>(inv_group_len, s1, s2) ? refined_stats(group, shift, s1, s2)
                                                       : group_stats(double(group_len), inv_group_len, double(shift),
                                                                     s1, s2, p.eps);
  };
  // Applies elements [begin, end) of group ng, channel by channel.
  auto group_apply = [&](int64_t ng, int64_t begin, int64_t end) {
    const int64_t g = ng % p.G;
    const int64_t base = ng * group_len;
    for (int64_t d = begin / p.HxW; d * p.HxW < end; ++d) {
      const int64_t lo = max_i64(begin, d * p.HxW), hi = min_i64(end, (d + 1) * p.HxW);
      if (stats[ng].wide) {
        wide_apply_run<T, kSilu>(x + base + lo, y + base + lo, hi - lo, 1, stats[ng], weight, bias, g * D + d);
        continue;
      }
      const auto coeffs = channel_coeffs<T>(stats[ng], weight, bias, g * D + d);
      if (stream)
        apply_run<V, S, kSilu, true>(x + base + lo, y + base + lo, hi - lo, coeffs, backwards);
      else
        apply_run<V, S, kSilu, false>(x + base + lo, y + base + lo, hi - lo, coeffs, backwards);
    }
  };

  auto whole_group = [&](int64_t ng) {
    for (int64_t k = 0; k < nchunks; ++k) chunk_moments(ng * nchunks + k);
    group_finish(ng);
    group_apply(ng, 0, group_len);
  };

  const int nt = team_size(p.num_threads, groups * group_len, units);
  if (nt == 1) {  // no OpenMP region at all: a tiny call must not pay for a team
    for (int64_t ng = 0; ng < groups; ++ng) whole_group(ng);
    if (stream) V::stream_fence();
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
      // Each thread applies its own chunks, last summed first: those are still in its cache.
      const ThreadRange mine = thread_range(units);
      for (int64_t unit = mine.begin; unit < mine.end; ++unit) chunk_moments(unit);
#pragma omp barrier
#pragma omp for schedule(static)
      for (int64_t ng = 0; ng < groups; ++ng) group_finish(ng);
      for (int64_t unit = mine.end - 1; unit >= mine.begin; --unit) {
        const int64_t k = unit % nchunks;
        group_apply(unit / nchunks, k * chunk_len, min_i64((k + 1) * chunk_len, group_len));
      }
    }
    if (stream) V::stream_fence();
  }
  return kOk;
}

// ---------------------------------------------------------------------------------------------------------
// Channels-last (N, HxW, C): a sample is HxW rows of C channels; rows are cut into fixed chunks, each chunk
// accumulates per-channel shifted sums (vectorised across C), then channels merge into their group.

// Per-thread buffers of the channels-last kernel, C rounded up to whole vectors, carved from one block.
template <class T>
struct RowBuffers {
  int64_t padded;
  Scratch<double> block;
  T* shift;                      // per channel: shift K
  double *sum_d, *sq_d;          // per channel: sums in double
  T *mean_hi, *scale, *bias;     // per channel: apply coefficients of the current sample
  // The same in load_split's lane order (split_order), where V has load_split for S (sample_coeffs)
  T *split_mean_hi, *split_scale, *split_bias;
  bool clean = false;              // values_clean(the current sample's coefficients)
  const T* shifts_held = nullptr;  // the group shifts (one sample's) that `shift` holds per channel
  explicit RowBuffers(int64_t c_padded) : padded(c_padded), block(9 * c_padded) {
    double* base = block.data;  // each array gets c_padded doubles of room, enough for any T
    if (base) std::memset(base, 0, sizeof(double) * size_t(9 * c_padded));  // padding lanes stay 0
    shift = reinterpret_cast<T*>(base);
    sum_d = base + c_padded;
    sq_d = base + 2 * c_padded;
    mean_hi = reinterpret_cast<T*>(base + 3 * c_padded);
    scale = reinterpret_cast<T*>(base + 4 * c_padded);
    bias = reinterpret_cast<T*>(base + 5 * c_padded);
    split_mean_hi = reinterpret_cast<T*>(base + 6 * c_padded);
    split_scale = reinterpret_cast<T*>(base + 7 * c_padded);
    split_bias = reinterpret_cast<T*>(base + 8 * c_padded);
  }
  bool ok() const { return block.data != nullptr; }
};

// K lane-wise double accumulators to p[0, K*W); with kTail, the first `count` lanes of a[0] to p[0, count) (the
// column tiles' stores, column_sums' and backward_impl.h's column_grad_sums').
template <class V, int K, bool kTail>
inline void store_accs(double* p, const typename V::Acc* a, int64_t count) {
  constexpr int64_t W = V::kWidth;
  if constexpr (kTail) {
    double lanes[W];
    V::acc_store(lanes, a[0]);
    for (int64_t j = 0; j < count; ++j) p[j] = lanes[j];
  } else {
#pragma GCC unroll 8
    for (int i = 0; i < K; ++i) V::acc_store(p + i * W, a[i]);
  }
}

// Shifted sums of K vectors of channels starting at c over rows [r0, r1) into b.sum_d / b.sq_d (with kTail, one
// vector of which only `count` channels exist, the rest read as 0 - 0, and only those written): runs of
// kFlushIters rows in T in registers, each widened into lane-wise double accumulators (V::Acc), stored once. As
// column_grad_sums (backward_impl.h): the same runs added in the same order as the flush through b's T arrays
// that this replaced, so the sums are the same to the bit.
template <class V, int K, bool kTail, class S>
void column_sums(const S* sample, int64_t C, int64_t c, int64_t count, int64_t r0, int64_t r1,
                 RowBuffers<typename V::Scalar>& b) {
  using T = typename V::Scalar;
  using Acc = typename V::Acc;
  constexpr int64_t W = V::kWidth;
  V shift[K];
  Acc a_sum[K], a_sq[K];
  // The loops over K are unrolled by pragma: otherwise GCC first builds the arrays on the stack on every call
  // (rep stos, copies through xmm registers) and only then moves them to registers, a prologue that cost AVX2
  // channels-last forwards up to a quarter of their time (bench/NOTES.md, eleventh session). Likewise in
  // column_apply and column_grad_sums.
#pragma GCC unroll 8
  for (int i = 0; i < K; ++i) {
    shift[i] = V::load(b.shift + c + i * W);
    a_sum[i] = a_sq[i] = V::acc_zero();
  }
  for (int64_t rb = r0; rb < r1; rb += kFlushIters) {
    const int64_t re = min_i64(r1, rb + kFlushIters);
    V sum[K], sq[K];
#pragma GCC unroll 8
    for (int i = 0; i < K; ++i) sum[i] = sq[i] = V::zero();
    for (int64_t r = rb; r < re; ++r) {
      const S* row = sample + r * C + c;
      for (int i = 0; i < K; ++i) {
        const V d = (kTail ? V::load_tail(row, count, T(0)) : V::load(row + i * W)) - shift[i];
        sum[i] = sum[i] + d;
        sq[i] = fma(d, d, sq[i]);
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < K; ++i) {
      V::acc_add(a_sum[i], sum[i]);
      V::acc_add(a_sq[i], sq[i]);
    }
  }
  store_accs<V, K, kTail>(b.sum_d + c, a_sum, count);
  store_accs<V, K, kTail>(b.sq_d + c, a_sq, count);
}

// out[c] for every channel c of [0, C): lane c % W of f(load), where load(row) reads the vector of channels at
// c - c % W of a channels-last row (the last one masked, its lanes past C read as 0). f: sample_shifts' per-channel
// figures over its nine probed rows.
template <class V, class S, class F>
void channel_vectors(int64_t C, typename V::Scalar* out, F f) {
  using T = typename V::Scalar;
  constexpr int64_t W = V::kWidth;
  int64_t c = 0;
  for (; c + W <= C; c += W) V::store(out + c, f([c](const S* r) { return V::load(r + c); }));
  if (c < C) {
    alignas(64) T lanes[W];
    V::store(lanes, f([c, C](const S* r) { return V::load_tail(r + c, C - c, T(0)); }));
    for (int64_t i = 0; c + i < C; ++i) out[c + i] = lanes[i];
  }
}

// Where the channels-last statistics can take vdpbf16ps (kDotSums, groups of an even number of channels): every
// shift of a sample (sample_shifts') becomes 0 when each group's lies within half the range of its nine rows (the
// widest of the channels its shift came from), so that rows_shifted_sums sums the sample by rows_dot_sums. A group
// whose mean is still more than two standard deviations from 0, or whose sums left float's range (DAZ and FTZ among
// them), takes the second look as with any shift. channel[C, 2C) is scratch.
template <class V, class S>
void plain_sample_shifts(const Problem& p, const S* const* row, typename V::Scalar* channel,
                         typename V::Scalar* shift) {
  using T = typename V::Scalar;
  const int64_t C = p.C, D = C / p.G;
  T* const range = channel + C;
  auto spread = [&](auto load) {
    V lo = load(row[0]), hi = lo;
    for (int64_t k = 1; k < 9; ++k) {
      const V v = load(row[k]);
      lo = min(lo, v);
      hi = max(hi, v);
    }
    return hi - lo;
  };
  channel_vectors<V, S>(C, range, spread);
  for (int64_t g = 0; g < p.G; ++g) {
    const T* const r = range + g * D;
    auto wider = [](T a, T b) { return a < b ? b : a; };
    const T widest = D < 3 ? r[0] : wider(wider(r[0], r[D / 2]), r[D - 1]);
    if (!(2 * (shift[g] < 0 ? -shift[g] : shift[g]) <= widest)) return;  // a NaN too
  }
  for (int64_t g = 0; g < p.G; ++g) shift[g] = T(0);
}

// The shifts of one channels-last sample's groups, into shift[G] (channel[C] is scratch). A shift more than two
// standard deviations from its group's mean sends the group to refine_sums' second look, which in this layout
// walks the group row by row, one cache line a row: a fifth to a half of a [1,320,64,64] call per group, and
// about 100 us (a whole call) for a one-channel group of [1,256,56,56]. The median of three values lands that
// far out for 0.3% of groups of normal data: 9% of [1,320,64,64] G32 calls, and more than half of
// [1,256,56,56] G256 calls. Tukey's ninther (the median of three medians of three) for 0.0014%.
// Each channel's ninther is taken over nine rows spread across the sample, for all channels at once (nine vector
// loads a vector of channels: nine short lines a sample, for any G); a group's shift is its channel's ninther, or
// the median of its first, middle and last channels' ninthers when it has three channels or more.
template <class V, class S>
void sample_shifts(const Problem& p, const S* sample, typename V::Scalar* channel, typename V::Scalar* shift) {
  using T = typename V::Scalar;
  const int64_t C = p.C, D = C / p.G, rows = p.HxW;
  const S* row[9];
  for (int64_t k = 0; k < 9; ++k) row[k] = sample + k * (rows - 1) / 8 * C;
  auto med3 = [](V a, V b, V c) { return max(min(a, b), min(max(a, b), c)); };
  auto ninther = [&](auto load) {
    return med3(med3(load(row[0]), load(row[1]), load(row[2])), med3(load(row[3]), load(row[4]), load(row[5])),
                med3(load(row[6]), load(row[7]), load(row[8])));
  };
  channel_vectors<V, S>(C, channel, ninther);
  for (int64_t g = 0; g < p.G; ++g) {
    const T* const ch = channel + g * D;
    shift[g] = D < 3 ? ch[0] : median3(ch[0], ch[D / 2], ch[D - 1]);
  }
  if constexpr (kDotSums<V, S>) {
    if (D % 2 == 0) plain_sample_shifts<V>(p, row, channel, shift);
  }
}

// out[g] = the sums of entries [g * per_group, (g + 1) * per_group) of sum and sq, in order, for g < G: the
// channels-last statistics' per-channel (or per-pair) sums into group sums.
inline void group_totals(const double* sum, const double* sq, int64_t G, int64_t per_group, ShiftedSums* out) {
  for (int64_t g = 0; g < G; ++g) {
    double s1 = 0.0, s2 = 0.0;
    for (int64_t j = g * per_group; j < (g + 1) * per_group; ++j) {
      s1 += sum[j];
      s2 += sq[j];
    }
    out[g] = {s1, s2};
  }
}

// Sums of rows [r0, r1) of one bfloat16 sample around 0, per group, into out[G], by vdpbf16ps
// (VecF32::dot_pair_sums_bf16): each lane sums two adjacent channels, of one group since groups hold an even number
// of channels, over blocks of kDotRows rows flushed into double (16 terms a lane, as run_shifted_sums'). Against
// column_sums' widening, shift and fma: channels-last [1,320,64,64] bfloat16 forwards in 0.8x the time.
constexpr int64_t kDotRows = 8;

template <class V, class S>
void rows_dot_sums(const Problem& p, const S* sample, int64_t r0, int64_t r1, RowBuffers<typename V::Scalar>& b,
                   ShiftedSums* out) {
  const int64_t C = p.C, pairs = C / 2, group_pairs = C / p.G / 2;  // sum_d and sq_d: c_padded >= pairs + 16
  double* const sum_d = b.sum_d;
  double* const sq_d = b.sq_d;
  for (int64_t j = 0; j < ceil_div(pairs, 16) * 16; ++j) sum_d[j] = sq_d[j] = 0.0;
  for (int64_t rb = r0; rb < r1; rb += kDotRows)
    V::dot_pair_sums_bf16(sample + rb * C, C, min_i64(kDotRows, r1 - rb), C, sum_d, sq_d);
  group_totals(sum_d, sq_d, p.G, group_pairs, out);
}

// Shifted sums of rows [r0, r1) of one sample, per group, into out[G]. Every channel of group g is shifted
// by the same value, sample_shifts', so chunk sums add up without per-chunk divisions and channel sums
// add up to group sums.
template <class V, class S>
void rows_shifted_sums(const Problem& p, const S* sample, const typename V::Scalar* shifts, int64_t r0, int64_t r1,
                       RowBuffers<typename V::Scalar>& b, ShiftedSums* out) {
  using T = typename V::Scalar;
  constexpr int64_t W = V::kWidth;
  const int64_t C = p.C, D = C / p.G, c_full = C / W * W;
  if (r1 - r0 == 1) {  // one row: each group is a contiguous run of D channels
    for (int64_t g = 0; g < p.G; ++g)
      out[g] = any_run_shifted_sums<V>(sample + r0 * C + g * D, D, shifts[g]);
    return;
  }
  if constexpr (kDotSums<V, S>) {
    bool plain = D % 2 == 0;
    for (int64_t g = 0; plain && g < p.G; ++g) plain = shifts[g] == T(0);
    if (plain) {
      rows_dot_sums<V>(p, sample, r0, r1, b, out);
      return;
    }
  }
  if (b.shifts_held != shifts) {  // a sample new to these buffers: its shifts per channel (once, not per chunk:
    T* const shift = b.shift;     // G short loops a chunk were a tenth of a one-thread G256 call)
    for (int64_t g = 0; g < p.G; ++g) {
      for (int64_t c = g * D; c < (g + 1) * D; ++c) shift[c] = shifts[g];
    }
    b.shifts_held = shifts;
  }
  int64_t c = 0;
  for (; c + 4 * W <= c_full; c += 4 * W) column_sums<V, 4, false>(sample, C, c, C, r0, r1, b);
  for (; c < c_full; c += W) column_sums<V, 1, false>(sample, C, c, C, r0, r1, b);
  if (c < C) column_sums<V, 1, true>(sample, C, c, C - c, r0, r1, b);
  group_totals(b.sum_d, b.sq_d, p.G, D, out);
}

// a[0, n) rotated left by k, in place: a[j] takes a[(j + k) % n] (three reversals; no std template in an ISA TU).
template <class T>
void rotate_left(T* a, int64_t n, int64_t k) {
  auto reverse = [](T* lo, T* hi) {
    for (--hi; lo < hi; ++lo, --hi) {
      const T t = *lo;
      *lo = *hi;
      *hi = t;
    }
  };
  reverse(a, a + k);
  reverse(a + k, a + n);
  reverse(a, a + n);
}

// Loads sample n's per-channel coefficients into the thread's buffers: for each group, scale = rstd*w and
// shift = b - mean_lo*scale, one vector (or the group's last, partial vector) at a time, so no vector is
// ever read back from scalar stores; then rotated by head, row_rotation's count, for rows_apply. weight_t / bias_t
// hold the parameters in T (ones and zeros where absent), padded with zeros. Group g takes stats[g % period]: the
// rows of a folded problem (row_fold) hold each real group `fold` times.
template <class V, class S>
void sample_coeffs(const Problem& p, const GroupStats* stats, int64_t period, const typename V::Scalar* weight_t,
                   const typename V::Scalar* bias_t, int64_t head, RowBuffers<typename V::Scalar>& b) {
  using T = typename V::Scalar;
  constexpr int64_t W = V::kWidth;
  const int64_t D = p.C / p.G;
  for (int64_t g = 0; g < p.G; ++g) {
    const GroupStats& st = stats[g % period];
    const T mean_hi_s = T(st.mean);
    const V mean_hi = V::broadcast(mean_hi_s), rstd = V::broadcast(T(st.rstd));
    const V mean_lo = V::broadcast(T((st.mean - double(mean_hi_s)) + st.mean_lo));
    for (int64_t c = g * D; c < (g + 1) * D; c += W) {
      const int64_t n = min_i64(W, (g + 1) * D - c);
      if (n == W) {
        const V scale = rstd * V::load(weight_t + c);
        V::store(b.mean_hi + c, mean_hi);
        V::store(b.scale + c, scale);
        V::store(b.bias + c, V::load(bias_t + c) - mean_lo * scale);
      } else {
        const V scale = rstd * V::load_tail(weight_t + c, n, T(0));
        V::store_tail(b.mean_hi + c, mean_hi, n);
        V::store_tail(b.scale + c, scale, n);
        V::store_tail(b.bias + c, V::load_tail(bias_t + c, n, T(0)) - mean_lo * scale, n);
      }
    }
  }
  if (head > 0) {  // rows_apply reads the coefficients rotated: index j holds channel (head + j) % C
    rotate_left(b.mean_hi, p.C, head);
    rotate_left(b.scale, p.C, head);
    rotate_left(b.bias, p.C, head);
  }
  b.clean = values_clean<T>({b.mean_hi, b.scale, b.bias}, p.C);
  if constexpr (HasSplit<V, S>::value) {
    const T* from[] = {b.mean_hi, b.scale, b.bias};
    T* to[] = {b.split_mean_hi, b.split_scale, b.split_bias};
    for (int a = 0; a < 3; ++a) {
      std::memcpy(to[a], from[a], sizeof(T) * size_t(p.C));
      split_order<W>(to[a], p.C);
    }
  }
}

// The apply coefficients of K consecutive channel vectors: pointers to their first lanes.
template <class T>
struct ColumnCoeffs {
  const T *mean_hi, *scale, *shift;
};

// pair(i) for the vector pairs (i, i + 1) of a row's n whole vectors and one(n - 1) for an odd last one; from the
// last when `backwards` (apply_backwards), so that the row's stores go in the pass's order.
template <class Pair, class One>
inline void row_vectors(int64_t n, bool backwards, Pair pair, One one) {
  const int64_t paired = n / 2 * 2;
  if (backwards) {
    if (paired < n) one(n - 1);
    for (int64_t i = paired - 2; i >= 0; i -= 2) pair(i);
  } else {
    for (int64_t i = 0; i < paired; i += 2) pair(i);
    if (paired < n) one(n - 1);
  }
}

// One row's whole vectors [0, n) from value(i) to yr, in pairs (store_pair) unless streamed.
template <class V, bool kStream, bool kInputNaNs = true, class S, class Value>
inline void apply_row_vectors(S* yr, int64_t n, bool backwards, Value value) {
  constexpr int64_t W = V::kWidth;
  row_vectors(
      n, backwards, [&](int64_t i) { store_two<V, kStream, kInputNaNs>(yr + i * W, value(i), value(i + 1)); },
      [&](int64_t i) { store_vector<V, kStream>(yr + i * W, value(i)); });
}

// row(x + r*C + c, y + r*C + c) for each row r of [r0, r1), the last first when `backwards`.
template <class S, class Row>
inline void each_row(const S* x, S* y, int64_t C, int64_t c, int64_t r0, int64_t r1, bool backwards, Row row) {
  if (backwards) {
    for (int64_t r = r1 - 1; r >= r0; --r) row(x + r * C + c, y + r * C + c);
  } else {
    for (int64_t r = r0; r < r1; ++r) row(x + r * C + c, y + r * C + c);
  }
}

// Applies K vectors of channel coefficients to the columns starting at c of rows [r0, r1), the coefficients held
// in registers; with kTail, one vector of which only `count` channels exist. `backwards` (apply_backwards): the
// last row first, and each row's vectors from the last. With kSplit (K even, S with load_split), each pair of
// vectors is read and written by load_split and store_split, the coefficients k in split_order (sample_coeffs'
// split arrays, from a block start).
template <class V, int K, bool kTail, bool kSilu, bool kStream, bool kSplit = false, bool kInputNaNs = true, class S>
void column_apply(const S* x, S* y, int64_t C, int64_t c, int64_t count, int64_t r0, int64_t r1,
                  ColumnCoeffs<typename V::Scalar> k, bool backwards) {
  using T = typename V::Scalar;
  constexpr int64_t W = V::kWidth;
  V mean_hi[K], scale[K], shift[K];
#pragma GCC unroll 8
  for (int i = 0; i < K; ++i) {
    mean_hi[i] = V::load(k.mean_hi + i * W);
    scale[i] = V::load(k.scale + i * W);
    shift[i] = V::load(k.shift + i * W);
  }
  static_assert(!kSplit || (K % 2 == 0 && !kTail), "pairs of whole vectors");
  auto value = [&](const V& v, int i) { return activate<V, kSilu>(fma(v - mean_hi[i], scale[i], shift[i])); };
  auto row = [&](const S* xr, S* yr) {
    if constexpr (kSplit) {
      auto pair = [&](int i) {
        V a, b;
        load_split(xr + i * W, a, b);
        store_split<V, kStream, kInputNaNs>(yr + i * W, value(a, i), value(b, i + 1));
      };
      if (backwards) {
#pragma GCC unroll 8
        for (int i = K - 2; i >= 0; i -= 2) pair(i);
      } else {
#pragma GCC unroll 8
        for (int i = 0; i < K; i += 2) pair(i);
      }
    } else if (kTail) {
      V::store_tail(yr, value(V::load_tail(xr, count, T(0)), 0), count);
    } else {
      apply_row_vectors<V, kStream>(yr, K, backwards, [&](int64_t i) { return value(V::load(xr + i * W), int(i)); });
    }
  };
  each_row(x, y, C, c, r0, r1, backwards, row);
}

// Applies `vectors` whole vectors of channels starting at c to rows [r0, r1) row by row, each vector's
// coefficients loaded from k beside it: the rows are read and written in memory order. On AVX2, where a tile holds
// only two vectors' coefficients, this beats column_apply's tiles (the apply of [1,320,64,64] channels-last from L3
// on a Zen 3: the tiles' strided lines took about 1.5x as long as rows read in order; bench/NOTES.md). With
// `split` (the same coefficients in split_order, from c), vector pairs go through load_split and store_split.
template <class V, bool kSilu, bool kStream, bool kInputNaNs, class S>
void row_major_apply(const S* x, S* y, int64_t C, int64_t c, int64_t vectors, int64_t r0, int64_t r1,
                     ColumnCoeffs<typename V::Scalar> k, const ColumnCoeffs<typename V::Scalar>* split,
                     bool backwards) {
  using T = typename V::Scalar;
  constexpr int64_t W = V::kWidth;
  auto value = [&](const V& v, const ColumnCoeffs<T>& kk, int64_t i) {
    return activate<V, kSilu>(fma(v - V::load(kk.mean_hi + i * W), V::load(kk.scale + i * W),
                                  V::load(kk.shift + i * W)));
  };
  if (split) {
    const ColumnCoeffs<T> ks = *split;
    each_row(x, y, C, c, r0, r1, backwards, [&](const S* xr, S* yr) {
      auto pair = [&](int64_t i) {
        V a, b;
        load_split(xr + i * W, a, b);
        store_split<V, kStream, kInputNaNs>(yr + i * W, value(a, ks, i), value(b, ks, i + 1));
      };
      row_vectors(vectors, backwards, pair,
                  [&](int64_t i) { store_vector<V, kStream>(yr + i * W, value(V::load(xr + i * W), k, i)); });
    });
    return;
  }
  each_row(x, y, C, c, r0, r1, backwards, [&](const S* xr, S* yr) {
    apply_row_vectors<V, kStream, kInputNaNs>(yr, vectors, backwards,
                                              [&](int64_t i) { return value(V::load(xr + i * W), k, i); });
  });
}

// The rotation of a channels-last y: how many channels each row of y has before its first store boundary, so that
// the rows can be applied as "virtual rows" [head, C) + the next row's [0, head), each of which starts on the
// boundary (0 when the rows are already aligned, or when their alignment differs from row to row). The boundary
// is a cache line when rows are a whole number of lines long, else a vector when they are a whole number of
// vectors long. Stores that split a line between two channel tiles, written at different times, cost 7-10% on
// [1,320,64,64] bfloat16 against the same rows started on a line; a store split over two lines cost 15-25% of the
// whole call, and non-temporal stores need the alignment.
template <class S>
int64_t row_rotation(const S* y, int64_t C, int64_t W) {
  if (C % W != 0) return 0;
  const int64_t row_bytes = C * int64_t(sizeof(S));
  const int64_t unit = row_bytes % kLineBytes == 0 ? kLineBytes : W * int64_t(sizeof(S));
  const int64_t off = int64_t(reinterpret_cast<uintptr_t>(y) % uint64_t(unit));
  return off == 0 ? 0 : (unit - off) / int64_t(sizeof(S));
}

// Applies m (1 <= m <= K - 1) whole vectors of channels starting at c as one tile, so the lines they cover are
// written together.
template <class V, int K, bool kSilu, bool kStream, class S>
void column_apply_rest(const S* x, S* y, int64_t C, int64_t c, int64_t m, int64_t r0, int64_t r1,
                       ColumnCoeffs<typename V::Scalar> k, bool backwards) {
  if (m == 1) {
    column_apply<V, 1, false, kSilu, kStream>(x, y, C, c, C, r0, r1, k, backwards);
  } else if constexpr (K > 2) {
    if (m == 2)
      column_apply<V, 2, false, kSilu, kStream>(x, y, C, c, C, r0, r1, k, backwards);
    else
      column_apply<V, 3, false, kSilu, kStream>(x, y, C, c, C, r0, r1, k, backwards);
  }
}

// Applies the sample's coefficients to rows [r0, r1) in blocks of rows that stay in L1 across the tiles. The
// coefficients come rotated by head = row_rotation(y) (sample_coeffs): index j holds channel (head + j) % C. With
// head > 0 the block's rows go as virtual rows (row_rotation), all of whose stores are aligned and whole; only the
// chunk's first row's [0, head) and its last row's [head, C) go on their own, with a masked first vector.
// `backwards` (apply_backwards) runs the blocks, the pieces, the tiles and their rows in the opposite order.
template <class V, class S, bool kSilu, bool kStream, bool kInputNaNs>
void rows_apply(const Problem& p, const S* x, S* y, int64_t r0, int64_t r1, const RowBuffers<typename V::Scalar>& b,
                int64_t head, bool backwards) {
  using T = typename V::Scalar;
  // Tiles of K = 4 channel vectors, their coefficients in registers (three each), on 32-register ISAs. AVX2, where
  // a tile would hold two, goes row by row (row_major_apply). The scalar level keeps the tiles: its compute-bound
  // loop gains nothing from either, and so every machine's tests run the tile code that AVX-512 and NEON use.
  constexpr int64_t W = V::kWidth;
  constexpr bool kRowMajor = V::kRegisters < 32 && W > 1;
  constexpr int K = 4;
  const int64_t C = p.C;
  const int64_t rows_per_block = max_i64(1, kL1TileBytes / int64_t(sizeof(S) * C));
  // Channels [c0, c1) of rows [rb, re) of xs / ys, their coefficients from index k0: `lead` channels as one masked
  // vector (up to the first vector boundary of y), K-vector tiles, one tile of the whole vectors left, a masked tail.
  auto span = [&](const S* xs, S* ys, int64_t c0, int64_t c1, int64_t k0, int64_t lead, int64_t rb, int64_t re) {
    auto at = [&](int64_t c) { return ColumnCoeffs<T>{b.mean_hi + k0 + c - c0, b.scale + k0 + c - c0,
                                                      b.bias + k0 + c - c0}; };
    const int64_t a = c0 + lead;
    const int64_t tiles = (c1 - a) / (K * W), rest_at = a + tiles * K * W;
    const int64_t rest = (c1 - rest_at) / W, tail_at = rest_at + rest * W;
    // From coefficient 0 (every span but a chunk's first row's piece), pairs go split (split_order from 0), their
    // coefficients from split_at.
    const bool from_zero = HasSplit<V, S>::value && k0 + a - c0 == 0;
    auto split_at = [&](int64_t c) {
      return ColumnCoeffs<T>{b.split_mean_hi + c - a, b.split_scale + c - a, b.split_bias + c - a};
    };
    auto first = [&] {
      if (lead > 0) column_apply<V, 1, true, kSilu, false>(xs, ys, C, c0, lead, rb, re, at(c0), backwards);
    };
    auto tile = [&] {
      if constexpr (kRowMajor) {  // every whole vector, the rest tile's included
        const ColumnCoeffs<T> split = split_at(a);
        if (tail_at > a)
          row_major_apply<V, kSilu, kStream, kInputNaNs>(xs, ys, C, a, (tail_at - a) / W, rb, re, at(a),
                                                         from_zero ? &split : nullptr, backwards);
      } else {
        for (int64_t i = 0; i < tiles; ++i) {
          const int64_t c = a + (backwards ? tiles - 1 - i : i) * K * W;
          if constexpr (HasSplit<V, S>::value) {
            if (from_zero) {
              column_apply<V, K, false, kSilu, kStream, true, kInputNaNs>(xs, ys, C, c, C, rb, re, split_at(c),
                                                                          backwards);
              continue;
            }
          }
          column_apply<V, K, false, kSilu, kStream>(xs, ys, C, c, C, rb, re, at(c), backwards);
        }
      }
    };
    auto rest_tile = [&] {
      if constexpr (!kRowMajor)
        if (rest > 0) column_apply_rest<V, K, kSilu, kStream>(xs, ys, C, rest_at, rest, rb, re, at(rest_at), backwards);
    };
    auto tail = [&] {
      if (tail_at < c1)
        column_apply<V, 1, true, kSilu, false>(xs, ys, C, tail_at, c1 - tail_at, rb, re, at(tail_at), backwards);
    };
    if (backwards) {
      tail();
      rest_tile();
      tile();
      first();
    } else {
      first();
      tile();
      rest_tile();
      tail();
    }
  };
  auto block = [&](int64_t rb, int64_t re) {
    if (head == 0) {
      span(x, y, 0, C, 0, 0, rb, re);
      return;
    }
    const int64_t virtual_end = min_i64(re, r1 - 1);  // the virtual row of r1 - 1 would run into the next chunk
    auto first_row = [&] {
      if (rb == r0) span(x, y, 0, head, C - head, head % W, r0, r0 + 1);
    };
    auto virtual_rows = [&] {
      if (rb < virtual_end) span(x + head, y + head, 0, C, 0, 0, rb, virtual_end);
    };
    auto last_row = [&] {
      if (re == r1) span(x, y, head, C, 0, 0, r1 - 1, r1);
    };
    if (backwards) {
      last_row();
      virtual_rows();
      first_row();
    } else {
      first_row();
      virtual_rows();
      last_row();
    }
  };
  const int64_t blocks = ceil_div(r1 - r0, rows_per_block);
  for (int64_t k = 0; k < blocks; ++k) {
    const int64_t rb = r0 + (backwards ? blocks - 1 - k : k) * rows_per_block;
    block(rb, min_i64(r1, rb + rows_per_block));
  }
}
// How many channels-last rows the passes take as one (row_fold): a row narrower than a few vectors, or with a
// masked tail vector, cost its per-row overhead or a masked load and store per row ([1,2,1048576] took 12x the
// copy, [1,12,262144] 3x). k rows of C values are whole vectors when k is a multiple of W / gcd(C, W); k doubles
// from there while the rows stay under 4 vectors and HxW stays a multiple of k. Where HxW is not a multiple of
// W / gcd(C, W) (an odd HxW and an even k), k doubles while the rows stay under 4 vectors and HxW holds at least
// kFoldedRowsMin of them; the last HxW % k rows of each sample (fold_remainder) then go channel by channel, in
// Wide<T> as a wide group's do ([1,2,2**30+12345] took 14 s, 13 ns a row). 1 where the rows would pass
// kFoldedRowMax values, or HxW is short of kFoldedRowsMin folded rows. The folded row of k*C channels holds each
// group k times.
constexpr int64_t kFoldedRowMax = 256;
constexpr int64_t kFoldedRowsMin = 8;

inline int64_t row_fold(const Problem& p, int64_t W) {
  int64_t a = p.C, b = W;  // gcd
  while (b != 0) {
    const int64_t t = a % b;
    a = b;
    b = t;
  }
  int64_t k = W / a;
  if (p.C * k > kFoldedRowMax) return 1;
  if (p.HxW % k == 0) {
    while (p.C * k < 4 * W && p.HxW % (2 * k) == 0 && p.C * 2 * k <= kFoldedRowMax) k *= 2;
    return k;
  }
  if (p.HxW < kFoldedRowsMin * k) return 1;
  while (p.C * k < 4 * W && p.HxW >= kFoldedRowsMin * 2 * k && p.C * 2 * k <= kFoldedRowMax) k *= 2;
  return k;
}

// The rows of a sample left over after its whole folded rows: p.HxW % fold (0 for fold 1).
inline int64_t fold_remainder(const Problem& p, int64_t fold) { return p.HxW % fold; }

// p with its rows taken `fold` at a time: rows of fold * C channels and fold * G groups (p itself for fold 1).
inline Problem folded_problem(const Problem& p, int64_t fold) {
  Problem q = p;
  q.C = p.C * fold;
  q.G = p.G * fold;
  q.HxW = p.HxW / fold;
  return q;
}

// a[period, n) takes a[0, period) over and over: per-channel (or per-group) values for a folded row.
template <class T>
void repeat_prefix(T* a, int64_t period, int64_t n) {
  for (int64_t i = period; i < n; ++i) a[i] = a[i - period];
}

template <class V, class S, bool kSilu>
Status forward_channels_last(const Problem& p, const S* x, const typename V::Scalar* weight,
                             const typename V::Scalar* bias, S* y, GroupStats* stats) {
  using T = typename V::Scalar;
  // The passes walk rows of the folded problem q (row_fold; q is p where fold is 1): its sums come per folded group
  // and add up, fold by fold, to the real groups' (Cr, Gr), whose statistics and rare second looks take p's rows.
  // A sample's last `rest` rows of p (fold_remainder), past q's, go with its last chunk, group by group.
  const int64_t fold = row_fold(p, V::kWidth), rest = fold_remainder(p, fold), Cr = p.C, Gr = p.G, D = Cr / Gr;
  const Problem q = folded_problem(p, fold);
  const int64_t rows = q.HxW, C = q.C, G = q.G, sample_len = p.HxW * Cr, rest_at = rows * C;
  const int64_t chunk_rows = max_i64(ceil_div(kChunkMinElems, C), ceil_div(rows, kChunksMax));
  const int64_t nchunks = ceil_div(rows, chunk_rows);
  const int64_t units = p.N * nchunks;
  // One spare vector: rows_apply's first row reads a whole coefficient vector from index C - head for its masked
  // first vector.
  const int64_t c_padded = (ceil_div(C, V::kWidth) + 1) * V::kWidth;
  Scratch<ShiftedSums> partial(units * G);
  Scratch<T> params(2 * c_padded);
  Scratch<T> shifts(p.N * G);  // read once here (nine far-apart rows a sample), not per chunk
  Scratch<ShiftedSums> rest_sums(rest ? p.N * Gr : 0);
  if (!partial.data || !params.data || !shifts.data || !rest_sums.data) return kOutOfMemory;
  for (int64_t n = 0; n < p.N; ++n) {  // params is their scratch until the parameters are written below
    T* const shift = shifts.data + n * G;
    sample_shifts<V>(p, x + n * sample_len, params.data, shift);
    repeat_prefix(shift, Gr, G);
  }
  T* const weight_t = params.data;
  T* const bias_t = params.data + c_padded;
  for (int64_t c = 0; c < c_padded; ++c) {
    weight_t[c] = c >= C ? T(0) : weight ? T(weight[c % Cr]) : T(1);
    bias_t[c] = c >= C ? T(0) : bias ? T(bias[c % Cr]) : T(0);
  }

  auto chunk_moments = [&](int64_t unit, RowBuffers<T>& b) {
    const int64_t n = unit / nchunks, k = unit % nchunks;
    rows_shifted_sums<V>(q, x + n * sample_len, shifts.data + n * G, k * chunk_rows,
                         min_i64(rows, (k + 1) * chunk_rows), b, partial.data + unit * G);
    for (int64_t g = 0; rest && k == nchunks - 1 && g < Gr; ++g)
      rest_sums.data[n * Gr + g] =
          strided_shifted_sums<V>(x + n * sample_len + rest_at + g * D, D, Cr, rest, shifts.data[n * G + g]);
  };
  const double count = double(p.HxW) * double(Cr / Gr), inv_count = 1.0 / count;
  // The statistics of (real) groups [g0, g1) of sample n.
  auto sample_finish = [&](int64_t n, int64_t g0, int64_t g1) {
    // Chunk sums fold into chunk 0's row of G entries, chunk by chunk: each group still adds its chunks in
    // order, and memory is read in sequence rather than G entries apart; then a folded row's copies of a group
    // into its first.
    ShiftedSums* total = partial.data + n * nchunks * G;
    for (int64_t k = 1; k < nchunks; ++k) {
      const ShiftedSums* chunk = total + k * G;
      for (int64_t j = 0; j < fold; ++j) {
        for (int64_t g = j * Gr + g0; g < j * Gr + g1; ++g) {
          total[g].s1 += chunk[g].s1;
          total[g].s2 += chunk[g].s2;
        }
      }
    }
    for (int64_t j = 1; j < fold; ++j) {
      for (int64_t g = g0; g < g1; ++g) {
        total[g].s1 += total[j * Gr + g].s1;
        total[g].s2 += total[j * Gr + g].s2;
      }
    }
    for (int64_t g = g0; rest && g < g1; ++g) {
      total[g].s1 += rest_sums.data[n * Gr + g].s1;
      total[g].s2 += rest_sums.data[n * Gr + g].s2;
    }
    const S* sample = x + n * sample_len;
    // The second look at group g's sums (rare), out of line so the loop over groups stays small.
    auto refined_stats = [&](int64_t g, T shift, double s1, double s2) __attribute__((noinline)) {
      auto visit = [&](auto&& f) {
        for (int64_t r = 0; r < p.HxW; ++r) f(sample + r * Cr + g * D, D);
      };
      auto resum = [&](T k, double& r1, double& r2) {
        const ShiftedSums sums = strided_shifted_sums<V>(sample + g * D, D, Cr, p.HxW, k);
        r1 = sums.s1;
        r2 = sums.s2;
      };
      if (refine_sums<V>(inv_count, shift, s1, s2, resum, visit))
        return wide_group_stats(count, shift, p.eps, visit);
      return group_stats(count, inv_count, double(shift), s1, s2, p.eps);
    };
    // Two passes: the moments of every group, then the groups' 1/sqrt back to back and the rare second looks.
    GroupStats* const sample_stats = stats + n * Gr;
    unsigned char refine = 0;
    for (int64_t g = g0; g < g1; ++g) {
      const double s1 = total[g].s1, s2 = total[g].s2;
      sample_stats[g] = group_moments(count, inv_count, double(shifts.data[n * G + g]), s1, s2, p.eps);
      sample_stats[g].wide = needs_refine<T>(inv_count, s1, s2);  // marks the group for its second look
      refine |= sample_stats[g].wide ? 1 : 0;
    }
    for (int64_t g = g0; g < g1; ++g) sample_stats[g].rstd = finish_rstd(sample_stats[g].rstd);
    for (int64_t g = g0; refine && g < g1; ++g) {
      if (!sample_stats[g].wide) continue;
      sample_stats[g] = refined_stats(g, shifts.data[n * G + g], total[g].s1, total[g].s2);
    }
  };
  // Whether sample n holds a wide group, once its groups are finished.
  auto sample_wide = [&](int64_t n) {
    for (int64_t g = 0; g < Gr; ++g)
      if (stats[n * Gr + g].wide) return true;
    return false;
  };
  const bool stream = streams_output(p, sizeof(S)) && C % V::kWidth == 0, backwards = apply_backwards(x, y);
  // Per sample: with rows left apart (rest), a sample is not a whole number of q's rows, so its rows' alignment
  // differs from sample 0's (and the non-temporal stores need it).
  auto head_of = [&](int64_t n) { return row_rotation(y + n * sample_len, C, V::kWidth); };
  auto chunk_apply = [&](int64_t n, int64_t k, const RowBuffers<T>& b, bool wide) {
    const int64_t r0 = k * chunk_rows, r1 = min_i64(rows, (k + 1) * chunk_rows);
    const S* xs = x + n * sample_len;
    S* ys = y + n * sample_len;
    // A sample holding a wide group (rare) is applied channel by channel in Wide<T>, every group of it: the
    // vector pass writes whole rows, and in place it would overwrite the wide group's input first.
    if (rest && k == nchunks - 1)  // the sample's rows past q's (fold_remainder), channel by channel in Wide<T>
      for (int64_t c = 0; c < Cr; ++c)
        wide_apply_run<T, kSilu>(xs + rest_at + c, ys + rest_at + c, rest, Cr, stats[n * Gr + c / D], weight,
                                 bias, c);
    if (wide) {  // in p's rows: rows [r0, r1) of q are fold times as many of p
      for (int64_t c = 0; c < Cr; ++c)
        wide_apply_run<T, kSilu>(xs + r0 * C + c, ys + r0 * C + c, (r1 - r0) * fold, Cr, stats[n * Gr + c / D],
                                 weight, bias, c);
    } else {
      with_input_nans<S>(b.clean, [&](auto input_nans) {
        constexpr bool kInputNaNs = decltype(input_nans)::value;
        if (stream)
          rows_apply<V, S, kSilu, true, kInputNaNs>(q, xs, ys, r0, r1, b, head_of(n), backwards);
        else
          rows_apply<V, S, kSilu, false, kInputNaNs>(q, xs, ys, r0, r1, b, head_of(n), backwards);
      });
    }
  };

  auto whole_sample = [&](int64_t n, RowBuffers<T>& b) {
    for (int64_t k = 0; k < nchunks; ++k) chunk_moments(n * nchunks + k, b);
    sample_finish(n, 0, Gr);
    const bool wide = sample_wide(n);
    sample_coeffs<V, S>(q, stats + n * Gr, Gr, weight_t, bias_t, head_of(n), b);
    for (int64_t k = nchunks - 1; k >= 0; --k) chunk_apply(n, k, b, wide);  // last summed first: still in cache
  };

  const int nt = team_size(p.num_threads, p.N * sample_len, units);
  if (nt == 1) {  // no OpenMP region at all: a tiny call must not pay for a team
    RowBuffers<T> b(c_padded);
    if (!b.ok()) return kOutOfMemory;
    for (int64_t n = 0; n < p.N; ++n) whole_sample(n, b);
    if (stream) V::stream_fence();
    return kOk;
  }
  const bool whole_samples = p.N % nt == 0 || p.N >= 8 * int64_t(nt);
  int failed = 0;
#pragma omp parallel num_threads(nt) reduction(| : failed)
  {
    RowBuffers<T> b(c_padded);
    const bool ok = b.ok();
    failed |= ok ? 0 : 1;
    if (whole_samples) {
#pragma omp for schedule(static)
      for (int64_t n = 0; n < p.N; ++n)
        if (ok) whole_sample(n, b);
    } else {
      // Each thread applies its own chunks, last summed first: those are still in its cache.
      const ThreadRange mine = thread_range(units);
      for (int64_t unit = mine.begin; unit < mine.end; ++unit)
        if (ok) chunk_moments(unit, b);
#pragma omp barrier
      // The samples' groups, split evenly (one sample's groups among all threads when N < threads): each group
      // folds its own chunks in order, so the split changes no result.
      const ThreadRange finish = thread_range(p.N * Gr);
      for (int64_t n = finish.begin / Gr; n * Gr < finish.end; ++n)
        sample_finish(n, max_i64(finish.begin - n * Gr, 0), min_i64(finish.end - n * Gr, Gr));
#pragma omp barrier
      int64_t coeffs_of = -1;
      bool wide = false;
      for (int64_t unit = mine.end - 1; unit >= mine.begin; --unit) {
        if (!ok) continue;
        const int64_t n = unit / nchunks;
        if (n != coeffs_of) {
          sample_coeffs<V, S>(q, stats + n * Gr, Gr, weight_t, bias_t, head_of(n), b);
          wide = sample_wide(n);
          coeffs_of = n;
        }
        chunk_apply(n, unit % nchunks, b, wide);
      }
    }
    if (stream) V::stream_fence();
  }
  return failed ? kOutOfMemory : kOk;
}

// ---------------------------------------------------------------------------------------------------------
// One position per sample (HxW = 1: an (N, C) input, either layout): a group is D contiguous values of one row.
// Consecutive groups go in blocks: their sums, their 1/sqrt back to back, then the apply straight from weight
// and bias, with none of the per-channel buffers that rows of many positions amortise. Groups of a power of two
// values up to a few vectors go packed instead (packed_batch). The groups' statistics go to `stats`, which may be
// null when the caller keeps none.

// y = act((x - mean) * rstd * weight + bias) over one group's D contiguous channels of a single row; weight and
// bias point at the group's first channel (or are null). Inline: a tiny group's apply is a handful of operations.
template <class V, bool kSilu, class S>
__attribute__((always_inline)) inline void apply_group_row(const S* x, S* y, int64_t D, const GroupStats& s,
                                                          const typename V::Scalar* weight,
                                                          const typename V::Scalar* bias) {
  using T = typename V::Scalar;
  constexpr int64_t W = V::kWidth;
  const T mean_hi_s = T(s.mean);
  const V mean_hi = V::broadcast(mean_hi_s), rstd = V::broadcast(T(s.rstd));
  const V mean_lo = V::broadcast(T((s.mean - double(mean_hi_s)) + s.mean_lo));
  for (int64_t c = 0; c < D; c += W) {
    const int64_t n = min_i64(W, D - c);
    const V w = !weight ? V::broadcast(T(1)) : n == W ? V::load(weight + c) : V::load_tail(weight + c, n, T(1));
    const V b = !bias ? V::zero() : n == W ? V::load(bias + c) : V::load_tail(bias + c, n, T(0));
    const V scale = rstd * w;
    const V v = n == W ? V::load(x + c) : V::load_tail(x + c, n, T(0));
    const V out = activate<V, kSilu>(fma(v - mean_hi, scale, b - mean_lo * scale));
    if (n == W)
      V::store(y + c, out);
    else
      V::store_tail(y + c, out, n);
  }
}

// Every lane's sum over its aligned run of `len` lanes (len a power of two, at most the width): a butterfly of
// swap_lanes, after which every lane of a run holds the same bits.
template <int kLen, class V>
inline V segment_sum(V a) {
  for (int stride = 1; stride < kLen; stride *= 2) a = a + V::swap_lanes(a, stride);
  return a;
}

// Groups of D values, D a power of two, packed: W / D groups to a vector when D divides the width W, else a group
// to D / W vectors (up to kPackedMaxVecs), summed lane-wise first. Every lane carries its group's sums, so a group
// costs a few lane swaps and no horizontal sum, scalar step or broadcast. In T, each pass relative to the one
// before: the group's first value is the shift (x - shift holds no offset, exactly where x lies within a factor 2
// of it), then q is the mean of x - shift, then var the mean square of e = x - shift - q: every rounding error is
// a few ulps of the group's spread, never of its offset; y = e * (rstd * w) + b. In three phases over the batch's
// len values (a multiple of D, at most kPackedBatch): the units' e and variances; the groups' 1/sqrt in double,
// back to back (one per group, not one per lane); then the apply. x and y point at flat offset f0 (a multiple of
// W) of the row, c0 = f0 mod C; lane_w and lane_b (or null) hold W readable parameters from every channel c < C
// on. A unit whose variance leaves [var_lo, var_hi] without its group being constant (squares that overflow or
// underflow T, an infinity or a NaN) is left to fallback(offset, n), which writes its groups (and their
// statistics) the general way. st (if not null) receives the batch's groups' statistics.
constexpr int64_t kPackedBatch = 256;
constexpr int64_t kPackedMaxVecs = 4;  // groups of up to this many vectors are packed too

// The first phase for groups of D values (the only one templated on D): each unit's e (to e_all) and its groups'
// variances (var_g) and, if mean_g is not null, means; bad[u] marks the units left to the general path. Returns
// whether any is.
template <class V, int64_t D, class S>
bool packed_sums(const S* x, int64_t len, typename V::Scalar* e_all, typename V::Scalar* var_g,
                 typename V::Scalar* mean_g, bool* bad) {
  using T = typename V::Scalar;
  constexpr int64_t W = V::kWidth;
  // A unit: one vector of W / D groups, or the kVecs vectors of one group (kLen: the lanes a sum runs over).
  constexpr int64_t kVecs = D > W ? D / W : 1, kLen = D > W ? W : D, kUnit = kVecs * W;
  static_assert(kPackedBatch % kUnit == 0, "a batch is whole units");
  constexpr T var_lo = sizeof(T) == 4 ? T(0x1p-100) : T(0x1p-900), var_hi = sizeof(T) == 4 ? T(0x1p100) : T(0x1p900);
  alignas(64) T lanes[W];
  bool any_bad = false;
  const V inv = V::broadcast(T(1) / T(D));  // exact: D is a power of two
  auto keep_lanes = [&](const V& a, T* per_group, int64_t f, int64_t n) {
    V::store(lanes, a);
    for (int64_t k = 0; k < n && k < W; k += D) per_group[(f + k) / D] = lanes[k];
  };
  for (int64_t u = 0, nunits = ceil_div(len, kUnit); u < nunits; ++u) {
    const int64_t f = u * kUnit, n = min_i64(kUnit, len - f);  // n < kUnit only with one vector a unit
    V v[kVecs];
    v[0] = n == kUnit ? V::load(x + f) : V::load_tail(x + f, n, T(0));  // filled lanes: constant groups of 0
    for (int64_t i = 1; i < kVecs; ++i) v[i] = V::load(x + f + i * W);
    const V shift = V::segment_first(v[0], kLen);
    V sum = V::zero();
    for (int64_t i = 0; i < kVecs; ++i) {
      v[i] = v[i] - shift;
      sum = sum + v[i];
    }
    const V q = segment_sum<kLen>(sum) * inv;
    V squares = V::zero();
    for (int64_t i = 0; i < kVecs; ++i) {
      v[i] = v[i] - q;
      squares = squares + v[i] * v[i];
      V::store(e_all + f + i * W, v[i]);
    }
    const V var = segment_sum<kLen>(squares) * inv;
    keep_lanes(var, var_g, f, n);
    bool ok = V::all_in(var, var_lo, var_hi);
    if (!ok) {
      // A group of one value (D = 1), of equal values (zero padding), or one the sums cannot hold: only the
      // constant groups (every e exactly 0, their variance 0) stay. `lanes` holds var (keep_lanes stored it).
      ok = true;
      for (int64_t j = 0; j < kUnit; ++j) {
        const T var_j = lanes[j % W];
        ok = ok && ((var_lo <= var_j && var_j <= var_hi) || (var_j == T(0) && e_all[f + j] == T(0)));
      }
    }
    bad[u] = !ok;
    any_bad = any_bad || !ok;
    if (mean_g) keep_lanes(shift + q, mean_g, f, n);  // the mean rounded once, as T(GroupStats::mean) would be
  }
  return any_bad;
}

// A batch of packed groups of D = 2^log2_d values: packed_sums, then the groups' 1/sqrt, then the apply (not
// templated on D: only the first phase's arithmetic depends on it at compile time).
template <class V, bool kSilu, class S, class Fallback>
void packed_batch(const S* x, S* y, int64_t len, int log2_d, int64_t C, int64_t c0, const typename V::Scalar* lane_w,
                  const typename V::Scalar* lane_b, double eps, GroupStats* st, Fallback&& fallback) {
  using T = typename V::Scalar;
  constexpr int64_t W = V::kWidth;
  const int64_t D = int64_t(1) << log2_d, len_lanes = min_i64(D, W), unit = max_i64(D, W);
  const int log2_unit = log2_d > __builtin_ctzll(uint64_t(W)) ? log2_d : __builtin_ctzll(uint64_t(W));
  alignas(64) T e_all[kPackedBatch], var_g[kPackedBatch], rstd_g[kPackedBatch + W], mean_g[kPackedBatch];
  bool bad[kPackedBatch];
  T* const means = st ? mean_g : nullptr;
  bool any_bad = false;
  switch (log2_d) {
    case 0: any_bad = packed_sums<V, 1>(x, len, e_all, var_g, means, bad); break;
    case 1: any_bad = packed_sums<V, 2>(x, len, e_all, var_g, means, bad); break;
    case 2: any_bad = packed_sums<V, 4>(x, len, e_all, var_g, means, bad); break;
    case 3: if constexpr (8 <= kPackedMaxVecs * W) any_bad = packed_sums<V, 8>(x, len, e_all, var_g, means, bad); break;
    case 4: if constexpr (16 <= kPackedMaxVecs * W) any_bad = packed_sums<V, 16>(x, len, e_all, var_g, means, bad); break;
    case 5: if constexpr (32 <= kPackedMaxVecs * W) any_bad = packed_sums<V, 32>(x, len, e_all, var_g, means, bad); break;
    default: if constexpr (64 <= kPackedMaxVecs * W) any_bad = packed_sums<V, 64>(x, len, e_all, var_g, means, bad); break;
  }
  const int64_t groups = len >> log2_d;
  // In double, as the general path: eps may be far below float's precision or range (a subnormal, say).
  for (int64_t j = 0; j < groups; ++j) rstd_g[j] = T(1.0 / __builtin_sqrt(double(var_g[j]) + eps));
  for (int64_t j = groups; j < groups + W; ++j) rstd_g[j] = T(0);  // spread reads a whole vector
  const int64_t step = W % C;  // the next vector's first channel: (c + W) mod C, with no division
  for (int64_t f = 0, c = c0; f < len; f += W, c = c + step >= C ? c + step - C : c + step) {
    if (bad[f >> log2_unit]) continue;
    const int64_t n = min_i64(W, len - f);
    const V rstd = V::spread(rstd_g + (f >> log2_d), len_lanes);
    const V scale = lane_w ? rstd * V::load(lane_w + c) : rstd;
    const V out = activate<V, kSilu>(fma(V::load(e_all + f), scale, lane_b ? V::load(lane_b + c) : V::zero()));
    if (n == W)
      V::store(y + f, out);
    else
      V::store_tail(y + f, out, n);
  }
  for (int64_t j = 0; st && j < groups; ++j) st[j] = {double(mean_g[j]), 0.0, double(rstd_g[j]), false};
  for (int64_t f = 0; any_bad && f < len; f += unit)
    if (bad[f >> log2_unit]) fallback(f, min_i64(unit, len - f));
}

template <class V, class S, bool kSilu>
Status forward_single_row(const Problem& p, const S* x, const typename V::Scalar* weight,
                          const typename V::Scalar* bias, S* y, GroupStats* stats) {
  using T = typename V::Scalar;
  const int64_t C = p.C, G = p.G, D = C / G;
  const double count = double(D), inv_count = 1.0 / count;
  auto group_shift = [&](const S* run) {
    return run_median3<T>(run, D);
  };
  // The second look at a group's sums (rare), out of line.
  auto refined_stats = [&](const S* run, T shift, double s1, double s2) __attribute__((noinline)) {
    auto visit = [&](auto&& f) { f(run, D); };
    auto resum = [&](T k, double& r1, double& r2) {
      const ShiftedSums sums = run_shifted_sums<V>(run, D, k);
      r1 = sums.s1;
      r2 = sums.s2;
    };
    if (refine_sums<V>(inv_count, shift, s1, s2, resum, visit)) return wide_group_stats(count, shift, p.eps, visit);
    return group_stats(count, inv_count, double(shift), s1, s2, p.eps);
  };
  // The N*G groups follow one another in memory, D values each (group i holds channels (i % G)*D onwards), so
  // they go in blocks of consecutive groups, whatever the sample: a few loops of many iterations, not four
  // short loops a sample, whose exits a tiny call would pay in mispredicted branches. Within a block, batches of
  // kBatch groups go in phases: each group's sums; then the moments, the checks and the 1/sqrt of the whole
  // batch, straight-line arithmetic over arrays that the compiler vectorises across groups; then the rare second
  // looks; then the apply.
  constexpr int64_t kBatch = 64;
  auto group_batch = [&](int64_t i0, int64_t i1) {
    const int64_t m = i1 - i0;
    double shift_d[kBatch], s1[kBatch], s2[kBatch], mean[kBatch], mean_lo[kBatch], rstd[kBatch];
    unsigned char again[kBatch];
    const S* const xs = x + i0 * D;
    for (int64_t j = 0; j < m; ++j) {
      const T shift = group_shift(xs + j * D);
      const ShiftedSums sums = any_run_shifted_sums<V>(xs + j * D, D, shift);
      shift_d[j] = double(shift);
      s1[j] = sums.s1;
      s2[j] = sums.s2;
    }
    // Locals, not the captured references: through those GCC cannot prove the loop's stores leave them alone,
    // and does not vectorise it (no vsqrtpd/vdivpd).
    const double eps = p.eps, n_values = count, inv = inv_count;
    const bool single = D == 1;
    unsigned char any_again = 0;
    for (int64_t j = 0; j < m; ++j) {
      const GroupStats g = group_moments(n_values, inv, shift_d[j], s1[j], s2[j], eps);
      mean[j] = g.mean;
      mean_lo[j] = g.mean_lo;
      rstd[j] = finish_rstd(g.rstd);
      // A single value is its own shift: sums of exactly 0 then say a constant group, nothing to look at again.
      const bool look = needs_refine<T>(inv, s1[j], s2[j]) && (!single || s1[j] != 0.0 || s2[j] != 0.0);
      again[j] = look ? 1 : 0;
      any_again |= again[j];
    }
    GroupStats local[kBatch];  // when the caller keeps no statistics
    GroupStats* const st = stats ? stats + i0 : local;
    for (int64_t j = 0; j < m; ++j) st[j] = {mean[j], mean_lo[j], rstd[j], false};
    for (int64_t j = 0; any_again && j < m; ++j) {
      if (!again[j]) continue;
      const S* run = xs + j * D;
      st[j] = refined_stats(run, T(shift_d[j]), s1[j], s2[j]);
    }
    for (int64_t j = 0, c0 = (i0 % G) * D; j < m; ++j, c0 = c0 + D == C ? 0 : c0 + D) {
      if (st[j].wide) {
        for (int64_t k = 0; k < D; ++k)
          wide_apply_run<T, kSilu>(xs + j * D + k, y + (i0 + j) * D + k, 1, 1, st[j], weight, bias, c0 + k);
      } else {
        apply_group_row<V, kSilu>(xs + j * D, y + (i0 + j) * D, D, st[j], weight ? weight + c0 : nullptr,
                                  bias ? bias + c0 : nullptr);
      }
    }
  };
  // Groups of a power of two values up to kPackedMaxVecs vectors go packed (packed_batch): the vector at flat
  // offset f takes its lanes' parameters from channel f mod C onwards, straight from weight and bias when C is a
  // multiple of W (so is f), otherwise from copies tiled past C (entry k = param[k mod C], k < C + W).
  constexpr int64_t W = V::kWidth;
  const bool packed = (D & (D - 1)) == 0 && D <= kPackedMaxVecs * W;
  const bool tile = packed && C % W != 0;
  Scratch<T> tiled_w(tile && weight ? C + W : 0), tiled_b(tile && bias ? C + W : 0);
  if (!tiled_w.data || !tiled_b.data) return kOutOfMemory;
  if (tile) {
    for (int64_t k = 0; weight && k < C + W; ++k) tiled_w.data[k] = weight[k % C];
    for (int64_t k = 0; bias && k < C + W; ++k) tiled_b.data[k] = bias[k % C];
  }
  const T* const lane_w = !weight ? nullptr : tile ? tiled_w.data : weight;
  const T* const lane_b = !bias ? nullptr : tile ? tiled_b.data : bias;
  const double eps = p.eps;
  const int log2_d = __builtin_ctzll(uint64_t(D));
  auto packed_block = [&](int64_t i0, int64_t i1) {  // i0 * D is a multiple of W (blocks are)
    const int64_t f1 = i1 * D;
    for (int64_t f = i0 * D; f < f1; f += kPackedBatch) {
      const int64_t len = min_i64(kPackedBatch, f1 - f);
      GroupStats* const st = stats ? stats + f / D : nullptr;
      auto fallback = [&](int64_t k, int64_t n) { group_batch((f + k) / D, (f + k + n) / D); };
      packed_batch<V, kSilu>(x + f, y + f, len, log2_d, C, f % C, lane_w, lane_b, eps, st, fallback);
    }
  };
  auto group_block = [&](int64_t i0, int64_t i1) {
    if (packed) return packed_block(i0, i1);
    for (int64_t i = i0; i < i1; i += kBatch) group_batch(i, min_i64(i1, i + kBatch));
  };
  const int64_t groups = p.N * G, block_groups = max_i64(1, kRowBlockElems / D);
  const int64_t nblocks = ceil_div(groups, block_groups);
  auto one_block = [&](int64_t k) { group_block(k * block_groups, min_i64(groups, (k + 1) * block_groups)); };
  const int nt = team_size(p.num_threads, p.N * C, nblocks);
  if (nt == 1) {  // no OpenMP region at all: a tiny call must not pay for a team
    for (int64_t k = 0; k < nblocks; ++k) one_block(k);
    return kOk;
  }
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t k = 0; k < nblocks; ++k) one_block(k);
  return kOk;
}

// out[c*HxW + i] = per_channel[c] for every position i of channel c: per-channel parameters for the short-run
// paths, which index them by position.
template <class T>
void spread_over_positions(const T* per_channel, int64_t C, int64_t HxW, T* out) {
  for (int64_t c = 0; c < C; ++c)
    for (int64_t i = 0; i < HxW; ++i) out[c * HxW + i] = per_channel[c];
}

// Channels-first with under kShortRun positions a channel: sample n is one row of C*HxW values in G groups of
// D*HxW, so it runs as a single row whose "channels" are the positions, with weight and bias spread over them
// (C*HxW values each, once a call). Per channel, runs of under a vector paid a masked apply and its coefficients
// each ([256,64,2,2] G8, 2 threads: 190 -> 54 us). From 16 positions (a whole AVX-512 vector) the per-channel
// path holds its own, and is faster on wide groups ([8,1280,4,4] G32: 80 against 96 us).
template <class V, class S>
Status forward_short_runs(const Problem& p, const S* x, const typename V::Scalar* weight,
                          const typename V::Scalar* bias, S* y, GroupStats* stats) {
  using T = typename V::Scalar;
  const int64_t len = p.C * p.HxW;
  Scratch<T> spread_w(weight ? len : 0), spread_b(bias ? len : 0);
  if (!spread_w.data || !spread_b.data) return kOutOfMemory;
  if (weight) spread_over_positions(weight, p.C, p.HxW, spread_w.data);
  if (bias) spread_over_positions(bias, p.C, p.HxW, spread_b.data);
  Problem row = p;
  row.C = len;
  row.HxW = 1;
  const T* const w = weight ? spread_w.data : nullptr;
  const T* const b = bias ? spread_b.data : nullptr;
  return p.activation == Activation::kSilu ? forward_single_row<V, S, true>(row, x, w, b, y, stats)
                                           : forward_single_row<V, S, false>(row, x, w, b, y, stats);
}

// ---------------------------------------------------------------------------------------------------------

template <class V, class S>
Status group_norm_forward_impl(const Problem& p, const S* x, const typename V::Scalar* weight,
                               const typename V::Scalar* bias, S* y, typename V::Scalar* mean_out,
                               typename V::Scalar* rstd_out) {
  const int64_t groups = p.N * p.G;
  if (groups == 0) return kOk;
  const bool empty = p.HxW == 0 || p.C == 0, silu = p.activation == Activation::kSilu;
  const bool single_row = p.HxW == 1;  // both layouts are the same memory then
  const bool short_runs = !single_row && p.layout == Layout::kChannelsFirst && p.HxW < kShortRun &&
                          !streams_output(p, sizeof(S));
  // The statistics: asked for, or what the per-channel paths' apply reads; the single-row paths need none.
  const bool keep = mean_out || rstd_out;
  Scratch<GroupStats> stats(keep || !(empty || single_row || short_runs) ? groups : 0);
  if (!stats.data) return kOutOfMemory;
  GroupStats* const kept = keep ? stats.data : nullptr;
  Status status = kOk;
  if (empty) {
    for (int64_t i = 0; keep && i < groups; ++i) stats.data[i] = group_stats(0.0, 0.0, 0.0, 0.0, 0.0, p.eps);
  } else if (single_row) {
    status = silu ? forward_single_row<V, S, true>(p, x, weight, bias, y, kept)
                  : forward_single_row<V, S, false>(p, x, weight, bias, y, kept);
  } else if (short_runs) {
    status = forward_short_runs<V, S>(p, x, weight, bias, y, kept);
  } else if (p.layout == Layout::kChannelsFirst) {
    status = silu ? forward_channels_first<V, S, true>(p, x, weight, bias, y, stats.data)
                  : forward_channels_first<V, S, false>(p, x, weight, bias, y, stats.data);
  } else {
    status = silu ? forward_channels_last<V, S, true>(p, x, weight, bias, y, stats.data)
                  : forward_channels_last<V, S, false>(p, x, weight, bias, y, stats.data);
  }
  if (status == kOk && keep) store_group_stats(stats.data, groups, mean_out, rstd_out);
  return status;
}

}  // namespace GROUPNORM_ISA
}  // namespace groupnorm
