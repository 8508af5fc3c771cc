// vec/scalar.h — Vec<T> of one lane in plain C++: the portable fallback and the reference for every ISA.
// No fused multiply-add: a*b+c rounds twice here, as the build compiles with -ffp-contract=off.
// float16 / bfloat16 storage goes through half.h's conversions (round to nearest even).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "groupnorm/half.h"

namespace groupnorm {
namespace scalar {

template <class T>
struct ScalarVec {
  using Scalar = T;
  static constexpr int kWidth = 1;
  static constexpr int kRegisters = 16;  // architectural vector registers
  T v;

  static ScalarVec zero() { return {T(0)}; }
  static ScalarVec broadcast(T a) { return {a}; }
  static ScalarVec load(const T* p) { return {*p}; }
  static void store(T* p, ScalarVec a) { *p = a.v; }
  static void store_stream(T* p, ScalarVec a) { *p = a.v; }  // no non-temporal store in plain C++
  static void stream_fence() {}
  // One lane never leaves a tail; kept so the kernel templates compile unchanged.
  static ScalarVec load_tail(const T* p, int64_t n, T fill) { return {n > 0 ? *p : fill}; }
  static void store_tail(T* p, ScalarVec a, int64_t n) {
    if (n > 0) *p = a.v;
  }

  // 16-bit storage (float lanes only).
  template <class H>
  static ScalarVec load(const H* p) {
    return {T(groupnorm::widen(*p))};
  }
  template <class H>
  static void store(H* p, ScalarVec a) {
    *p = narrow(a.v, p);
  }
  template <class H>
  static void store_stream(H* p, ScalarVec a) {
    *p = narrow(a.v, p);
  }
  template <class H>
  static ScalarVec load_tail(const H* p, int64_t n, T fill) {
    return {n > 0 ? T(groupnorm::widen(*p)) : fill};
  }
  template <class H>
  static void store_tail(H* p, ScalarVec a, int64_t n) {
    if (n > 0) *p = narrow(a.v, p);
  }
  static Half narrow(float v, const Half*) { return narrow_half(v); }
  static BFloat16 narrow(float v, const BFloat16*) { return narrow_bfloat16(v); }

  friend ScalarVec operator+(ScalarVec a, ScalarVec b) { return {a.v + b.v}; }
  friend ScalarVec operator-(ScalarVec a, ScalarVec b) { return {a.v - b.v}; }
  friend ScalarVec operator*(ScalarVec a, ScalarVec b) { return {a.v * b.v}; }
  friend ScalarVec operator/(ScalarVec a, ScalarVec b) { return {a.v / b.v}; }
  friend ScalarVec fma(ScalarVec a, ScalarVec b, ScalarVec c) { return {a.v * b.v + c.v}; }
  // A NaN operand gives b, as x86's minps / maxps do (one_plus_exp_neg's clamp turns a NaN into a number).
  friend ScalarVec min(ScalarVec a, ScalarVec b) { return {a.v < b.v ? a.v : b.v}; }
  friend ScalarVec max(ScalarVec a, ScalarVec b) { return {a.v > b.v ? a.v : b.v}; }
  // 2^n from t = n + bias + 1.5 * 2^m (one_plus_exp_neg's rounding): the low mantissa bits shifted into the exponent.
  friend ScalarVec pow2_of_rounded(ScalarVec t) {
    using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
    Bits bits;
    std::memcpy(&bits, &t.v, sizeof bits);
    bits <<= (sizeof(T) == 4 ? 23 : 52);
    std::memcpy(&t.v, &bits, sizeof bits);
    return t;
  }
  // Double accumulators of lane sums (one lane here).
  struct Acc {
    double v;
  };
  static Acc acc_zero() { return {0.0}; }
  static void acc_add(Acc& acc, ScalarVec a) { acc.v += double(a.v); }
  static double acc_sum(const Acc& acc) { return acc.v; }
  static void acc_store(double* p, const Acc& acc) { *p = acc.v; }  // the lane sum to p[0]
  static T sum_lanes(ScalarVec a) { return a.v; }
  // One lane: segment_sum never swaps (its runs are one lane), kept so the kernel templates compile unchanged.
  static ScalarVec swap_lanes(ScalarVec a, int) { return a; }
  static ScalarVec spread(const T* p, int64_t) { return {*p}; }  // lane k holds p[k / len]
  static ScalarVec segment_first(ScalarVec a, int64_t) { return a; }  // lane k holds lane k & ~(len - 1)
  // Whether the lane lies in [lo, hi] (a NaN does not).
  static bool all_in(ScalarVec a, T lo, T hi) { return lo <= a.v && a.v <= hi; }
};

using VecF32 = ScalarVec<float>;
using VecF64 = ScalarVec<double>;

}  // namespace scalar
}  // namespace groupnorm
