// vec/avx512.h — Vec<T> on AVX-512 (F, BW, DQ, VL): 16 float or 8 double lanes in a zmm register.
// Tails use masked loads and stores, so no byte outside [p, p + n) is ever touched.
// float16 / bfloat16 storage converts in registers: vcvtph2ps / vcvtps2ph (round to nearest even) for binary16,
// a 16-bit shift for bfloat16, and an integer round-half-even for its narrowing, or with AVX512_BF16 (compiled
// with -mavx512bf16) vcvtneps2bf16, whose flushed subnormals are redone the integer way.
// Include only from a translation unit compiled with the AVX-512 flags (cpp/kernels/isa/avx512.cpp, and
// avx512_bf16.cpp: its own namespace, so the two builds of these types never meet at link time).
#pragma once

#include <immintrin.h>
#include <cstdint>
#include <type_traits>

#include "groupnorm/half.h"

namespace groupnorm {
#ifdef __AVX512BF16__
namespace avx512_bf16 {
#else
namespace avx512 {
#endif

struct VecF32 {
  using Scalar = float;
  static constexpr int kWidth = 16;
  static constexpr int kRegisters = 32;  // architectural vector registers
  __m512 v;

  static __mmask16 mask(int64_t n) { return __mmask16((1u << n) - 1u); }
  static VecF32 zero() { return {_mm512_setzero_ps()}; }
  static VecF32 broadcast(float a) { return {_mm512_set1_ps(a)}; }
  static VecF32 load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static void store(float* p, VecF32 a) { _mm512_storeu_ps(p, a.v); }
  // Non-temporal store to a 64-byte aligned p; stream_fence orders such stores before later ones.
  static void store_stream(float* p, VecF32 a) { _mm512_stream_ps(p, a.v); }
  static void stream_fence() { _mm_sfence(); }
  static VecF32 load_tail(const float* p, int64_t n, float fill) {
    return {_mm512_mask_loadu_ps(_mm512_set1_ps(fill), mask(n), p)};
  }
  static void store_tail(float* p, VecF32 a, int64_t n) { _mm512_mask_storeu_ps(p, mask(n), a.v); }

  // 16-bit storage: W values are one 256-bit half register; streamed stores need 32-byte alignment.
  __attribute__((always_inline)) static VecF32 widen(__m256i bits, const Half*) { return {_mm512_cvtph_ps(bits)}; }
  __attribute__((always_inline)) static VecF32 widen(__m256i bits, const BFloat16*) {
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16))};
  }
  __attribute__((always_inline)) static __m256i narrow(VecF32 a, const Half*) {
    return _mm512_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
#ifdef __AVX512BF16__
  // vcvtneps2bf16 rounds to nearest even and quiets NaNs as narrow_bf16_bits does, but takes a subnormal float as
  // zero: such lanes (rare: results below 2^-126) take the integer rounding.
  __attribute__((always_inline)) static __m256i narrow(VecF32 a, const BFloat16* p) {
    const __m256i bits = __m256i(_mm512_cvtneps_pbh(a.v));
    const __mmask16 subnormal = _mm512_fpclass_ps_mask(a.v, 0x20);
    return subnormal ? _mm256_mask_blend_epi16(subnormal, bits, narrow_bf16_bits(a, p)) : bits;
  }
  // Two vectors to p[0, 2W) with one vcvtne2ps2bf16 and one subnormal test for both: a sixth less time than two
  // store()s in an L1-resident apply. Two 256-bit stores, so that a pair 32 bytes off a line splits none.
  template <bool = true>  // kInputNaNs (vec/avx2.h): no cheaper path here
  __attribute__((always_inline)) static void store_pair(BFloat16* p, VecF32 a, VecF32 b) {
    if (!_kortestz_mask16_u8(_mm512_fpclass_ps_mask(a.v, 0x20), _mm512_fpclass_ps_mask(b.v, 0x20))) {
      store(p, a);
      store(p + kWidth, b);
      return;
    }
    const __m512i bits = __m512i(_mm512_cvtne2ps_pbh(b.v, a.v));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_castsi512_si256(bits));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + kWidth), _mm512_extracti64x4_epi64(bits, 1));
  }
#else
  __attribute__((always_inline)) static __m256i narrow(VecF32 a, const BFloat16* p) { return narrow_bf16_bits(a, p); }
  // Two vectors to p[0, 2W): one pack and one quarter permute for both, where narrow() packs each alone.
  template <bool = true>  // kInputNaNs (vec/avx2.h): no cheaper path here
  __attribute__((always_inline)) static void store_pair(BFloat16* p, VecF32 a, VecF32 b) {
    const __m512i packed = _mm512_packus_epi32(bf16_lanes(a), bf16_lanes(b));  // per 128 bits: a 4, b 4, a 4, b 4
    const __m512i bits = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7), packed);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_castsi512_si256(bits));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + kWidth), _mm512_extracti64x4_epi64(bits, 1));
  }
#endif
  __attribute__((always_inline)) static __m256i narrow_bf16_bits(VecF32 a, const BFloat16*) {
    return _mm512_cvtepi32_epi16(bf16_lanes(a));
  }
  // p[0, 2W) split by parity, as vec/avx2.h's: `even` gets p[0], p[2], ..., `odd` p[1], p[3], ...; one load and one
  // shift or mask a vector, where load() zero-extends (a lane-crossing shuffle) and shifts. store_split puts the
  // lanes back (split_bits): with integer rounding and one 16-bit blend, or on the avx512_bf16 level by
  // vcvtne2ps2bf16 and one word permute.
  __attribute__((always_inline)) static void load_split(const BFloat16* p, VecF32& even, VecF32& odd) {
    const __m512i v = _mm512_loadu_si512(p);
    even.v = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    odd.v = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xFFFF0000u))));
  }
  // a rounded to nearest even as bfloat16 in the high half of each lane (the low half is left over): add 0x7fff plus
  // the kept part's lowest bit. A NaN keeps its sign and top payload bits and is made quiet. kInputNaNs false (vec/
  // avx2.h): no value carries the input's NaNs, and the default quiet NaN that arithmetic makes stays one.
  template <bool kInputNaNs = true>
  __attribute__((always_inline)) static __m512i bf16_rounded(VecF32 a) {
    const __m512i u = _mm512_castps_si512(a.v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    if (!kInputNaNs) return rounded;
    const __mmask16 nan = _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q);
    return _mm512_mask_or_epi32(rounded, nan, u, _mm512_set1_epi32(0x400000));
  }
  template <bool kInputNaNs = true>
  __attribute__((always_inline)) static __m512i split_bits_rounded(VecF32 even, VecF32 odd) {
    return _mm512_mask_blend_epi16(__mmask32(0xAAAAAAAAu), _mm512_srli_epi32(bf16_rounded<kInputNaNs>(even), 16),
                                   bf16_rounded<kInputNaNs>(odd));
  }
#ifdef __AVX512BF16__
  // One vcvtne2ps2bf16 (even lanes to words 0-15, odd to 16-31) and one word permute that interleaves them, beside
  // two subnormal tests: five instructions for two vectors where the integer rounding takes ten (bfloat16 NCHW
  // forward 0.86-0.88x the time, backward 0.92x; bench/NOTES.md). Its NaNs are bf16_rounded<true>'s; a subnormal
  // lane in either vector (rare) sends both the integer way.
  template <bool kInputNaNs = true>
  __attribute__((always_inline)) static __m512i split_bits(VecF32 even, VecF32 odd) {
    if (!_kortestz_mask16_u8(_mm512_fpclass_ps_mask(even.v, 0x20), _mm512_fpclass_ps_mask(odd.v, 0x20)))
      return split_bits_rounded<kInputNaNs>(even, odd);
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                                22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    return _mm512_permutexvar_epi16(interleave, __m512i(_mm512_cvtne2ps_pbh(odd.v, even.v)));
  }
#else
  template <bool kInputNaNs = true>
  __attribute__((always_inline)) static __m512i split_bits(VecF32 even, VecF32 odd) {
    return split_bits_rounded<kInputNaNs>(even, odd);
  }
#endif
  template <bool kInputNaNs = true>
  __attribute__((always_inline)) static void store_split(BFloat16* p, VecF32 even, VecF32 odd) {
    _mm512_storeu_si512(p, split_bits<kInputNaNs>(even, odd));
  }
  // Non-temporal, to a 32-byte aligned p (two 256-bit stores, as store_stream's alignment).
  template <bool kInputNaNs = true>
  __attribute__((always_inline)) static void store_split_stream(BFloat16* p, VecF32 even, VecF32 odd) {
    const __m512i bits = split_bits<kInputNaNs>(even, odd);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm512_castsi512_si256(bits));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p + kWidth), _mm512_extracti64x4_epi64(bits, 1));
  }
  // bf16_rounded, each bfloat16 in the low half of its 32-bit lane (the high half zero).
  __attribute__((always_inline)) static __m512i bf16_lanes(VecF32 a) { return _mm512_srli_epi32(bf16_rounded(a), 16); }
  template <class H>
  __attribute__((always_inline)) static VecF32 load(const H* p) {
    return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), p);
  }
  template <class H>
  __attribute__((always_inline)) static void store(H* p, VecF32 a) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow(a, p));
  }
  template <class H>
  __attribute__((always_inline)) static void store_stream(H* p, VecF32 a) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), narrow(a, p));
  }
  template <class H>
  static VecF32 load_tail(const H* p, int64_t n, float fill) {
    const VecF32 v = widen(_mm256_maskz_loadu_epi16(mask(n), p), p);
    return {_mm512_mask_blend_ps(mask(n), _mm512_set1_ps(fill), v.v)};
  }
  template <class H>
  static void store_tail(H* p, VecF32 a, int64_t n) {
    _mm256_mask_storeu_epi16(p, mask(n), narrow(a, p));
  }

  friend VecF32 operator+(VecF32 a, VecF32 b) { return {_mm512_add_ps(a.v, b.v)}; }
  friend VecF32 operator-(VecF32 a, VecF32 b) { return {_mm512_sub_ps(a.v, b.v)}; }
  friend VecF32 operator*(VecF32 a, VecF32 b) { return {_mm512_mul_ps(a.v, b.v)}; }
  friend VecF32 operator/(VecF32 a, VecF32 b) { return {_mm512_div_ps(a.v, b.v)}; }
  friend VecF32 fma(VecF32 a, VecF32 b, VecF32 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  friend VecF32 min(VecF32 a, VecF32 b) { return {_mm512_min_ps(a.v, b.v)}; }
  friend VecF32 max(VecF32 a, VecF32 b) { return {_mm512_max_ps(a.v, b.v)}; }
  // 2^n from t = n + 127 + 1.5 * 2^23 (one_plus_exp_neg's rounding): the low mantissa bits shifted into the exponent.
  friend VecF32 pow2_of_rounded(VecF32 t) {
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(t.v), 23))};
  }
  // Lane-wise double accumulators: a run's float partial sums widen and add in with no horizontal step, which
  // comes once, in acc_sum.
  struct Acc {
    __m512d lo, hi;
  };
  static Acc acc_zero() { return {_mm512_setzero_pd(), _mm512_setzero_pd()}; }
  static void acc_add(Acc& acc, VecF32 a) {
    acc.lo = _mm512_add_pd(acc.lo, _mm512_cvtps_pd(_mm512_castps512_ps256(a.v)));
    acc.hi = _mm512_add_pd(acc.hi, _mm512_cvtps_pd(_mm512_extractf32x8_ps(a.v, 1)));
  }
  static double acc_sum(const Acc& acc) { return _mm512_reduce_add_pd(_mm512_add_pd(acc.lo, acc.hi)); }
  // The W lane sums to p[0, W), lane by lane.
  __attribute__((always_inline)) static void acc_store(double* p, const Acc& acc) {
    _mm512_storeu_pd(p, acc.lo);
    _mm512_storeu_pd(p + 8, acc.hi);
  }
  // The sum of the lanes, in float: for a short run, whose few terms the float sum holds well enough.
  static float sum_lanes(VecF32 a) { return _mm512_reduce_add_ps(a.v); }
#ifdef __AVX512BF16__
  // The first min(n, 32) of a 512-bit register's 16-bit lanes (n >= 1): the bfloat16 dot loops' tails.
  static __mmask32 mask32(int64_t n) { return n >= 32 ? ~__mmask32(0) : __mmask32((1u << n) - 1u); }
  // Adds the sums of x and of x*x over bfloat16 p[0, n) to s1 and s2 by vdpbf16ps, which multiplies bfloat16 pairs
  // exactly and adds both products into a float lane: no widening and no shift, two terms a lane an instruction
  // (forward_impl.h, dot_sums). It takes inputs below 2^-126 as 0 and flushes products and sums below it (DAZ,
  // FTZ); the caller's range checks send such groups to the exact path. Each accumulator takes 16 terms a lane
  // before its lanes widen into s1 and s2, as run_shifted_sums's do.
  static void dot_sums_bf16(const BFloat16* p, int64_t n, Acc& s1, Acc& s2) {
    constexpr int64_t kBlock = 2 * 32 * 8;  // two accumulators of each sum, eight instructions each
    const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3F80);
    for (int64_t i = 0; i < n;) {
      __m512 a = _mm512_setzero_ps(), b = a, qa = a, qb = a;
      const int64_t end = n - i < kBlock ? n : i + kBlock;
      for (; i + 64 <= end; i += 64) {
        const __m512bh u = (__m512bh)_mm512_loadu_si512(p + i), v = (__m512bh)_mm512_loadu_si512(p + i + 32);
        a = _mm512_dpbf16_ps(a, u, ones);
        qa = _mm512_dpbf16_ps(qa, u, u);
        b = _mm512_dpbf16_ps(b, v, ones);
        qb = _mm512_dpbf16_ps(qb, v, v);
      }
      for (; i < end; i += 32) {  // the run's last 1 to 63 values; zeros past its end add nothing
        const __m512bh u = (__m512bh)_mm512_maskz_loadu_epi16(mask32(end - i), p + i);
        a = _mm512_dpbf16_ps(a, u, ones);
        qa = _mm512_dpbf16_ps(qa, u, u);
      }
      acc_add(s1, {_mm512_add_ps(a, b)});
      acc_add(s2, {_mm512_add_ps(qa, qb)});
    }
  }
  // The backward's first pass by vdpbf16ps over bfloat16 runs dy[0, n) and x[0, n) (backward_impl.h,
  // dot_grad_sums): adds the sums of dy, dy*x, x, dy*dy and x*x to the five accumulators, 16 terms a lane each
  // before they widen, with dot_sums_bf16's DAZ and FTZ.
  static void dot_grad_sums_bf16(const BFloat16* dy, const BFloat16* x, int64_t n, Acc& s_dy, Acc& s_dy_x, Acc& s_x,
                                 Acc& s_dy_dy, Acc& s_x_x) {
    constexpr int64_t kBlock = 32 * 8;  // eight instructions an accumulator
    const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3F80);
    for (int64_t i = 0; i < n;) {
      __m512 a_dy = _mm512_setzero_ps(), a_dy_x = a_dy, a_x = a_dy, a_dy_dy = a_dy, a_x_x = a_dy;
      const int64_t end = n - i < kBlock ? n : i + kBlock;
      for (; i < end; i += 32) {  // the run's last 1 to 31 values: masked, zeros past its end add nothing
        const __mmask32 live = mask32(end - i);
        const __m512bh g = (__m512bh)_mm512_maskz_loadu_epi16(live, dy + i);
        const __m512bh v = (__m512bh)_mm512_maskz_loadu_epi16(live, x + i);
        a_dy = _mm512_dpbf16_ps(a_dy, g, ones);
        a_dy_x = _mm512_dpbf16_ps(a_dy_x, g, v);
        a_x = _mm512_dpbf16_ps(a_x, v, ones);
        a_dy_dy = _mm512_dpbf16_ps(a_dy_dy, g, g);
        a_x_x = _mm512_dpbf16_ps(a_x_x, v, v);
      }
      acc_add(s_dy, {a_dy});
      acc_add(s_dy_x, {a_dy_x});
      acc_add(s_x, {a_x});
      acc_add(s_dy_dy, {a_dy_dy});
      acc_add(s_x_x, {a_x_x});
    }
  }
  // Channels-last sums by vdpbf16ps (forward_impl.h, rows_dot_sums): over rows [0, rows) of p, `stride` values
  // apart, of channels [0, n), two adjacent channels a lane: sum[j] and sq[j] gain the sums of x and of x*x over
  // channels 2j and 2j + 1, widened to double, for j < 16 * ceil(n / 32) (channels past n add 0). rows <= 8 keeps
  // dot_sums_bf16's 16 terms a lane, and its DAZ and FTZ. Column tiles of up to 12 vectors (384 channels, 24
  // accumulators) over all the rows, so that rows of up to 384 channels are read whole, in order.
  static void dot_pair_sums_bf16(const BFloat16* p, int64_t stride, int64_t rows, int64_t n, double* sum,
                                 double* sq) {
    auto add_wide = [](double* d, __m512 v) {
      const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
      _mm512_storeu_pd(d, _mm512_add_pd(_mm512_loadu_pd(d), _mm512_cvtps_pd(_mm512_castps512_ps256(v))));
      _mm512_storeu_pd(d + 8, _mm512_add_pd(_mm512_loadu_pd(d + 8), _mm512_cvtps_pd(high)));
    };
    const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3F80);
    auto tile = [&](auto vectors, int64_t c) {
      constexpr int K = decltype(vectors)::value;
      const __mmask32 last = mask32(n - c - 32 * (K - 1));
      __m512 a[K], q[K];
#pragma GCC unroll 12
      for (int i = 0; i < K; ++i) a[i] = q[i] = _mm512_setzero_ps();
      for (int64_t r = 0; r < rows; ++r) {
        const BFloat16* const row = p + r * stride + c;
#pragma GCC unroll 12
        for (int i = 0; i < K; ++i) {
          const __m512bh u = (__m512bh)(i == K - 1 ? _mm512_maskz_loadu_epi16(last, row + 32 * i)
                                                   : _mm512_loadu_si512(row + 32 * i));
          a[i] = _mm512_dpbf16_ps(a[i], u, ones);
          q[i] = _mm512_dpbf16_ps(q[i], u, u);
        }
      }
#pragma GCC unroll 12
      for (int i = 0; i < K; ++i) {
        add_wide(sum + c / 2 + 16 * i, a[i]);
        add_wide(sq + c / 2 + 16 * i, q[i]);
      }
    };
    int64_t c = 0;
    for (; n - c > 12 * 32; c += 8 * 32) tile(std::integral_constant<int, 8>{}, c);
    if (c < n) with_vectors<12>((n - c + 31) / 32, [&](auto vectors) { tile(vectors, c); });
  }
  // f(std::integral_constant<int, v>{}) for v in [1, K]: a tile width known at run time, unrolled at compile time.
  template <int K, class F>
  static void with_vectors(int64_t v, F f) {
    if (v == K) {
      f(std::integral_constant<int, K>{});
    } else if constexpr (K > 1) {
      with_vectors<K - 1>(v, f);
    }
  }
#endif
  // Lane i of the result is lane i ^ stride of a (stride 1, 2, 4 or 8): a step of segment_sum's butterfly.
  static VecF32 swap_lanes(VecF32 a, int stride) {
    switch (stride) {
      case 1: return {_mm512_permute_ps(a.v, 0xB1)};
      case 2: return {_mm512_permute_ps(a.v, 0x4E)};
      case 4: return {_mm512_shuffle_f32x4(a.v, a.v, 0xB1)};
      default: return {_mm512_shuffle_f32x4(a.v, a.v, 0x4E)};
    }
  }
  // Lane k holds lane k & ~(len - 1) of a: the first lane of its aligned run of len (a power of two).
  static VecF32 segment_first(VecF32 a, int64_t len) {
    const __m512i idx = _mm512_and_si512(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(-int(len)));
    return {_mm512_permutexvar_ps(idx, a.v)};
  }
  // Lane k holds p[k / len] (len a power of two up to the width; p[0, W / len) is read).
  static VecF32 spread(const float* p, int64_t len) {
    const __m512i idx = _mm512_srl_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm_cvtsi32_si128(__builtin_ctzll(uint64_t(len))));
    return {_mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps(mask(kWidth / len), p))};
  }
  // Whether every lane lies in [lo, hi] (a NaN lane does not).
  static bool all_in(VecF32 a, float lo, float hi) {
    return (_mm512_cmp_ps_mask(a.v, _mm512_set1_ps(lo), _CMP_GE_OQ) &
            _mm512_cmp_ps_mask(a.v, _mm512_set1_ps(hi), _CMP_LE_OQ)) == 0xFFFF;
  }
};

struct VecF64 {
  using Scalar = double;
  static constexpr int kWidth = 8;
  static constexpr int kRegisters = 32;  // architectural vector registers
  __m512d v;

  static __mmask8 mask(int64_t n) { return __mmask8((1u << n) - 1u); }
  static VecF64 zero() { return {_mm512_setzero_pd()}; }
  static VecF64 broadcast(double a) { return {_mm512_set1_pd(a)}; }
  static VecF64 load(const double* p) { return {_mm512_loadu_pd(p)}; }
  static void store(double* p, VecF64 a) { _mm512_storeu_pd(p, a.v); }
  static void store_stream(double* p, VecF64 a) { _mm512_stream_pd(p, a.v); }
  static void stream_fence() { _mm_sfence(); }
  static VecF64 load_tail(const double* p, int64_t n, double fill) {
    return {_mm512_mask_loadu_pd(_mm512_set1_pd(fill), mask(n), p)};
  }
  static void store_tail(double* p, VecF64 a, int64_t n) { _mm512_mask_storeu_pd(p, mask(n), a.v); }

  friend VecF64 operator+(VecF64 a, VecF64 b) { return {_mm512_add_pd(a.v, b.v)}; }
  friend VecF64 operator-(VecF64 a, VecF64 b) { return {_mm512_sub_pd(a.v, b.v)}; }
  friend VecF64 operator*(VecF64 a, VecF64 b) { return {_mm512_mul_pd(a.v, b.v)}; }
  friend VecF64 operator/(VecF64 a, VecF64 b) { return {_mm512_div_pd(a.v, b.v)}; }
  friend VecF64 fma(VecF64 a, VecF64 b, VecF64 c) { return {_mm512_fmadd_pd(a.v, b.v, c.v)}; }
  friend VecF64 min(VecF64 a, VecF64 b) { return {_mm512_min_pd(a.v, b.v)}; }
  friend VecF64 max(VecF64 a, VecF64 b) { return {_mm512_max_pd(a.v, b.v)}; }
  // 2^n from t = n + 1023 + 1.5 * 2^52 (one_plus_exp_neg's rounding).
  friend VecF64 pow2_of_rounded(VecF64 t) {
    return {_mm512_castsi512_pd(_mm512_slli_epi64(_mm512_castpd_si512(t.v), 52))};
  }
  struct Acc {
    __m512d v;
  };
  static Acc acc_zero() { return {_mm512_setzero_pd()}; }
  static void acc_add(Acc& acc, VecF64 a) { acc.v = _mm512_add_pd(acc.v, a.v); }
  static double acc_sum(const Acc& acc) { return _mm512_reduce_add_pd(acc.v); }
  __attribute__((always_inline)) static void acc_store(double* p, const Acc& acc) { _mm512_storeu_pd(p, acc.v); }
  static double sum_lanes(VecF64 a) { return _mm512_reduce_add_pd(a.v); }
  static VecF64 swap_lanes(VecF64 a, int stride) {  // stride 1, 2 or 4
    switch (stride) {
      case 1: return {_mm512_permute_pd(a.v, 0x55)};
      case 2: return {_mm512_shuffle_f64x2(a.v, a.v, 0xB1)};
      default: return {_mm512_shuffle_f64x2(a.v, a.v, 0x4E)};
    }
  }
  static VecF64 segment_first(VecF64 a, int64_t len) {
    const __m512i idx = _mm512_and_si512(_mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7), _mm512_set1_epi64(-len));
    return {_mm512_permutexvar_pd(idx, a.v)};
  }
  static VecF64 spread(const double* p, int64_t len) {
    const __m512i idx = _mm512_srl_epi64(_mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7),
                                         _mm_cvtsi32_si128(__builtin_ctzll(uint64_t(len))));
    return {_mm512_permutexvar_pd(idx, _mm512_maskz_loadu_pd(mask(kWidth / len), p))};
  }
  static bool all_in(VecF64 a, double lo, double hi) {
    return (_mm512_cmp_pd_mask(a.v, _mm512_set1_pd(lo), _CMP_GE_OQ) &
            _mm512_cmp_pd_mask(a.v, _mm512_set1_pd(hi), _CMP_LE_OQ)) == 0xFF;
  }
};

}  // namespace avx512 / avx512_bf16
}  // namespace groupnorm
