// vec/avx2.h — Vec<T> on AVX2 + FMA: 8 float or 4 double lanes in a ymm register.
// Tails go through a small stack buffer (the scalar-epilogue rule), so no byte outside [p, p + n) is touched.
// float16 / bfloat16 storage converts in registers: F16C for binary16 (round to nearest even), a 16-bit shift
// for bfloat16 and an integer round-half-even for its narrowing.
// Include only from a translation unit compiled with the AVX2 flags (cpp/kernels/isa/avx2.cpp).
#pragma once

#include <immintrin.h>
#include <cstdint>

#include "groupnorm/half.h"

namespace groupnorm {
namespace avx2 {

// The sum of a ymm register's four doubles.
inline double sum_lanes(__m256d v) {
  __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
  return _mm_cvtsd_f64(s);
}

struct VecF32 {
  using Scalar = float;
  static constexpr int kWidth = 8;
  static constexpr int kRegisters = 16;  // architectural vector registers
  __m256 v;

  static VecF32 zero() { return {_mm256_setzero_ps()}; }
  static VecF32 broadcast(float a) { return {_mm256_set1_ps(a)}; }
  static VecF32 load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static void store(float* p, VecF32 a) { _mm256_storeu_ps(p, a.v); }
  // Non-temporal store to a 32-byte aligned p; stream_fence orders such stores before later ones.
  static void store_stream(float* p, VecF32 a) { _mm256_stream_ps(p, a.v); }
  static void stream_fence() { _mm_sfence(); }
  static VecF32 load_tail(const float* p, int64_t n, float fill) {
    alignas(32) float buf[kWidth];
    for (int i = 0; i < kWidth; ++i) buf[i] = i < n ? p[i] : fill;
    return {_mm256_load_ps(buf)};
  }
  static void store_tail(float* p, VecF32 a, int64_t n) {
    alignas(32) float buf[kWidth];
    _mm256_store_ps(buf, a.v);
    for (int64_t i = 0; i < n; ++i) p[i] = buf[i];
  }

  // 16-bit storage: W values are one 128-bit register; streamed stores need 16-byte alignment.
  __attribute__((always_inline)) static VecF32 widen(__m128i bits, const Half*) { return {_mm256_cvtph_ps(bits)}; }
  __attribute__((always_inline)) static VecF32 widen(__m128i bits, const BFloat16*) {
    return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16))};
  }
  __attribute__((always_inline)) static __m128i narrow(VecF32 a, const Half*) {
    return _mm256_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT);
  }
  __attribute__((always_inline)) static __m128i narrow(VecF32 a, const BFloat16*) {
    const __m256i bits = bf16_lanes(a);
    return _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
  }
  // Round to nearest even in integer arithmetic, each bfloat16 in the high half of its 32-bit lane (the low half is
  // left over): add 0x7fff plus the kept part's lowest bit. A NaN keeps its sign and top payload bits and is made
  // quiet. With kInputNaNs false the caller knows that no value carries a NaN from the input (its data and
  // parameters are finite), so any NaN is one arithmetic made, the default quiet NaN with a zero low half, which the
  // add leaves a quiet NaN: the test and blend go (a tenth of a bfloat16 apply on a Zen 3).
  template <bool kInputNaNs = true>
  __attribute__((always_inline)) static __m256i bf16_rounded(VecF32 a) {
    const __m256i u = _mm256_castps_si256(a.v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    if (!kInputNaNs) return rounded;
    const __m256i quiet_nan = _mm256_or_si256(u, _mm256_set1_epi32(0x400000));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(rounded, quiet_nan, nan);
  }
  // The same, each bfloat16 in the low half of its lane (the high half zero).
  template <bool kInputNaNs = true>
  __attribute__((always_inline)) static __m256i bf16_lanes(VecF32 a) {
    return _mm256_srli_epi32(bf16_rounded<kInputNaNs>(a), 16);
  }
  // Two vectors to p[0, 2W): one pack and one lane permute for both, where narrow() packs each alone.
  template <bool kInputNaNs = true>
  __attribute__((always_inline)) static void store_pair(BFloat16* p, VecF32 a, VecF32 b) {
    // 64-bit quarters: a0-3 b0-3 a4-7 b4-7
    const __m256i packed = _mm256_packus_epi32(bf16_lanes<kInputNaNs>(a), bf16_lanes<kInputNaNs>(b));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(packed, 0xD8));
  }
  // p[0, 2W) split by parity: `even` gets p[0], p[2], ..., p[2W - 2] and `odd` p[1], p[3], ..., p[2W - 1]. One load
  // and one shift or mask a vector, where load() zero-extends and shifts; store_split puts the lanes back with no
  // pack or permute. For lane-wise work with one coefficient for every lane (a channels-first run): the
  // [1,320,64,64] bfloat16 forward at 0.7x the time of load() and store_pair() on a Zen 3.
  __attribute__((always_inline)) static void load_split(const BFloat16* p, VecF32& even, VecF32& odd) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    even.v = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    odd.v = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int(0xFFFF0000u))));
  }
  // even's bfloat16 shifted into the low halves, odd's left in the high halves, one 16-bit blend joining them (it
  // replaced a mask and an or: the [1,320,64,64] bfloat16 forward 4% faster on a Zen 3).
  template <bool kInputNaNs = true>
  __attribute__((always_inline)) static __m256i split_bits(VecF32 even, VecF32 odd) {
    return _mm256_blend_epi16(_mm256_srli_epi32(bf16_rounded<kInputNaNs>(even), 16), bf16_rounded<kInputNaNs>(odd),
                              0xAA);
  }
  template <bool kInputNaNs = true>
  __attribute__((always_inline)) static void store_split(BFloat16* p, VecF32 even, VecF32 odd) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), split_bits<kInputNaNs>(even, odd));
  }
  // Non-temporal, to a 16-byte aligned p (two 128-bit stores, as store_stream's alignment).
  template <bool kInputNaNs = true>
  __attribute__((always_inline)) static void store_split_stream(BFloat16* p, VecF32 even, VecF32 odd) {
    const __m256i bits = split_bits<kInputNaNs>(even, odd);
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(bits));
    _mm_stream_si128(reinterpret_cast<__m128i*>(p + kWidth), _mm256_extracti128_si256(bits, 1));
  }
  template <class H>
  __attribute__((always_inline)) static VecF32 load(const H* p) {
    return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), p);
  }
  template <class H>
  __attribute__((always_inline)) static void store(H* p, VecF32 a) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), narrow(a, p));
  }
  template <class H>
  __attribute__((always_inline)) static void store_stream(H* p, VecF32 a) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), narrow(a, p));
  }
  template <class H>
  static VecF32 load_tail(const H* p, int64_t n, float fill) {
    alignas(16) H buf[kWidth] = {};
    for (int64_t i = 0; i < n; ++i) buf[i] = p[i];
    const VecF32 v = widen(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)), p);
    const __m256 live = _mm256_castsi256_ps(
        _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
    return {_mm256_blendv_ps(_mm256_set1_ps(fill), v.v, live)};
  }
  template <class H>
  static void store_tail(H* p, VecF32 a, int64_t n) {
    alignas(16) H buf[kWidth];
    _mm_store_si128(reinterpret_cast<__m128i*>(buf), narrow(a, p));
    for (int64_t i = 0; i < n; ++i) p[i] = buf[i];
  }

  friend VecF32 operator+(VecF32 a, VecF32 b) { return {_mm256_add_ps(a.v, b.v)}; }
  friend VecF32 operator-(VecF32 a, VecF32 b) { return {_mm256_sub_ps(a.v, b.v)}; }
  friend VecF32 operator*(VecF32 a, VecF32 b) { return {_mm256_mul_ps(a.v, b.v)}; }
  friend VecF32 operator/(VecF32 a, VecF32 b) { return {_mm256_div_ps(a.v, b.v)}; }
  friend VecF32 fma(VecF32 a, VecF32 b, VecF32 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  friend VecF32 min(VecF32 a, VecF32 b) { return {_mm256_min_ps(a.v, b.v)}; }
  friend VecF32 max(VecF32 a, VecF32 b) { return {_mm256_max_ps(a.v, b.v)}; }
  // 2^n from t = n + 127 + 1.5 * 2^23 (one_plus_exp_neg's rounding): the low mantissa bits shifted into the exponent.
  friend VecF32 pow2_of_rounded(VecF32 t) {
    return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t.v), 23))};
  }
  // Lane-wise double accumulators: a run's float partial sums widen and add in with no horizontal step, which
  // comes once, in acc_sum.
  struct Acc {
    __m256d lo, hi;
  };
  static Acc acc_zero() { return {_mm256_setzero_pd(), _mm256_setzero_pd()}; }
  static void acc_add(Acc& acc, VecF32 a) {
    acc.lo = _mm256_add_pd(acc.lo, _mm256_cvtps_pd(_mm256_castps256_ps128(a.v)));
    acc.hi = _mm256_add_pd(acc.hi, _mm256_cvtps_pd(_mm256_extractf128_ps(a.v, 1)));
  }
  static double acc_sum(const Acc& acc) { return avx2::sum_lanes(_mm256_add_pd(acc.lo, acc.hi)); }
  // The W lane sums to p[0, W), lane by lane.
  __attribute__((always_inline)) static void acc_store(double* p, const Acc& acc) {
    _mm256_storeu_pd(p, acc.lo);
    _mm256_storeu_pd(p + 4, acc.hi);
  }
  // The sum of the lanes, in float: for a short run, whose few terms the float sum holds well enough.
  static float sum_lanes(VecF32 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // Lane i of the result is lane i ^ stride of a (stride 1, 2 or 4): a step of segment_sum's butterfly.
  static VecF32 swap_lanes(VecF32 a, int stride) {
    switch (stride) {
      case 1: return {_mm256_permute_ps(a.v, 0xB1)};
      case 2: return {_mm256_permute_ps(a.v, 0x4E)};
      default: return {_mm256_permute2f128_ps(a.v, a.v, 0x01)};
    }
  }
  // Lane k holds lane k & ~(len - 1) of a: the first lane of its aligned run of len (a power of two).
  static VecF32 segment_first(VecF32 a, int64_t len) {
    const __m256i idx = _mm256_and_si256(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(-int(len)));
    return {_mm256_permutevar8x32_ps(a.v, idx)};
  }
  // Lane k holds p[k / len] (len a power of two up to the width; p[0, W) must be readable, p[0, W / len) is used).
  static VecF32 spread(const float* p, int64_t len) {
    const __m256i idx = _mm256_srl_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                         _mm_cvtsi32_si128(__builtin_ctzll(uint64_t(len))));
    return {_mm256_permutevar8x32_ps(_mm256_loadu_ps(p), idx)};
  }
  // Whether every lane lies in [lo, hi] (a NaN lane does not).
  static bool all_in(VecF32 a, float lo, float hi) {
    const __m256 in = _mm256_and_ps(_mm256_cmp_ps(a.v, _mm256_set1_ps(lo), _CMP_GE_OQ),
                                    _mm256_cmp_ps(a.v, _mm256_set1_ps(hi), _CMP_LE_OQ));
    return _mm256_movemask_ps(in) == 0xFF;
  }
};

struct VecF64 {
  using Scalar = double;
  static constexpr int kWidth = 4;
  static constexpr int kRegisters = 16;  // architectural vector registers
  __m256d v;

  static VecF64 zero() { return {_mm256_setzero_pd()}; }
  static VecF64 broadcast(double a) { return {_mm256_set1_pd(a)}; }
  static VecF64 load(const double* p) { return {_mm256_loadu_pd(p)}; }
  static void store(double* p, VecF64 a) { _mm256_storeu_pd(p, a.v); }
  static void store_stream(double* p, VecF64 a) { _mm256_stream_pd(p, a.v); }
  static void stream_fence() { _mm_sfence(); }
  static VecF64 load_tail(const double* p, int64_t n, double fill) {
    alignas(32) double buf[kWidth];
    for (int i = 0; i < kWidth; ++i) buf[i] = i < n ? p[i] : fill;
    return {_mm256_load_pd(buf)};
  }
  static void store_tail(double* p, VecF64 a, int64_t n) {
    alignas(32) double buf[kWidth];
    _mm256_store_pd(buf, a.v);
    for (int64_t i = 0; i < n; ++i) p[i] = buf[i];
  }

  friend VecF64 operator+(VecF64 a, VecF64 b) { return {_mm256_add_pd(a.v, b.v)}; }
  friend VecF64 operator-(VecF64 a, VecF64 b) { return {_mm256_sub_pd(a.v, b.v)}; }
  friend VecF64 operator*(VecF64 a, VecF64 b) { return {_mm256_mul_pd(a.v, b.v)}; }
  friend VecF64 operator/(VecF64 a, VecF64 b) { return {_mm256_div_pd(a.v, b.v)}; }
  friend VecF64 fma(VecF64 a, VecF64 b, VecF64 c) { return {_mm256_fmadd_pd(a.v, b.v, c.v)}; }
  friend VecF64 min(VecF64 a, VecF64 b) { return {_mm256_min_pd(a.v, b.v)}; }
  friend VecF64 max(VecF64 a, VecF64 b) { return {_mm256_max_pd(a.v, b.v)}; }
  // 2^n from t = n + 1023 + 1.5 * 2^52 (one_plus_exp_neg's rounding).
  friend VecF64 pow2_of_rounded(VecF64 t) {
    return {_mm256_castsi256_pd(_mm256_slli_epi64(_mm256_castpd_si256(t.v), 52))};
  }
  struct Acc {
    __m256d v;
  };
  static Acc acc_zero() { return {_mm256_setzero_pd()}; }
  static void acc_add(Acc& acc, VecF64 a) { acc.v = _mm256_add_pd(acc.v, a.v); }
  static double acc_sum(const Acc& acc) { return avx2::sum_lanes(acc.v); }
  __attribute__((always_inline)) static void acc_store(double* p, const Acc& acc) { _mm256_storeu_pd(p, acc.v); }
  static double sum_lanes(VecF64 a) { return avx2::sum_lanes(a.v); }
  static VecF64 swap_lanes(VecF64 a, int stride) {  // stride 1 or 2
    return stride == 1 ? VecF64{_mm256_permute_pd(a.v, 0x5)} : VecF64{_mm256_permute2f128_pd(a.v, a.v, 0x01)};
  }
  static VecF64 segment_first(VecF64 a, int64_t len) {
    switch (len) {
      case 1: return a;
      case 2: return {_mm256_permute4x64_pd(a.v, 0xA0)};
      default: return {_mm256_permute4x64_pd(a.v, 0x00)};
    }
  }
  static VecF64 spread(const double* p, int64_t len) {
    switch (len) {
      case 1: return {_mm256_loadu_pd(p)};
      case 2: return {_mm256_permute4x64_pd(_mm256_castpd128_pd256(_mm_loadu_pd(p)), 0x50)};
      default: return {_mm256_broadcast_sd(p)};
    }
  }
  static bool all_in(VecF64 a, double lo, double hi) {
    const __m256d in = _mm256_and_pd(_mm256_cmp_pd(a.v, _mm256_set1_pd(lo), _CMP_GE_OQ),
                                     _mm256_cmp_pd(a.v, _mm256_set1_pd(hi), _CMP_LE_OQ));
    return _mm256_movemask_pd(in) == 0xF;
  }
};

}  // namespace avx2
}  // namespace groupnorm
