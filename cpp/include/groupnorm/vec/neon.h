// vec/neon.h — Vec<T> on AArch64 Advanced SIMD: 4 float or 2 double lanes in a q register.
// Tails go through a small stack buffer (the scalar-epilogue rule), as on AVX2.
// float16 converts with the native fcvtl / fcvtn (round to nearest even), bfloat16 with a 16-bit shift and an
// integer round-half-even. Compiled only on aarch64, where NEON is part of the base ISA and needs no extra flag.
#pragma once

#include <arm_neon.h>
#include <cstdint>

#include "groupnorm/half.h"

namespace groupnorm {
namespace neon {

struct VecF32 {
  using Scalar = float;
  static constexpr int kWidth = 4;
  static constexpr int kRegisters = 32;  // architectural vector registers
  float32x4_t v;

  static VecF32 zero() { return {vdupq_n_f32(0.0f)}; }
  static VecF32 broadcast(float a) { return {vdupq_n_f32(a)}; }
  static VecF32 load(const float* p) { return {vld1q_f32(p)}; }
  static void store(float* p, VecF32 a) { vst1q_f32(p, a.v); }
  static void store_stream(float* p, VecF32 a) { vst1q_f32(p, a.v); }  // plain store: no NT hint here
  static void stream_fence() {}
  static VecF32 load_tail(const float* p, int64_t n, float fill) {
    float buf[kWidth];
    for (int i = 0; i < kWidth; ++i) buf[i] = i < n ? p[i] : fill;
    return {vld1q_f32(buf)};
  }
  static void store_tail(float* p, VecF32 a, int64_t n) {
    float buf[kWidth];
    vst1q_f32(buf, a.v);
    for (int64_t i = 0; i < n; ++i) p[i] = buf[i];
  }

  // 16-bit storage: W values are one 64-bit d register.
  static VecF32 widen(uint16x4_t bits, const Half*) { return {vcvt_f32_f16(vreinterpret_f16_u16(bits))}; }
  static VecF32 widen(uint16x4_t bits, const BFloat16*) { return {vreinterpretq_f32_u32(vshll_n_u16(bits, 16))}; }
  static uint16x4_t narrow(VecF32 a, const Half*) { return vreinterpret_u16_f16(vcvt_f16_f32(a.v)); }
  static uint16x4_t narrow(VecF32 a, const BFloat16*) {
    const uint32x4_t u = vreinterpretq_u32_f32(a.v);
    const uint32x4_t lsb = vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1));
    const uint32x4_t rounded = vshrq_n_u32(vaddq_u32(u, vaddq_u32(lsb, vdupq_n_u32(0x7fff))), 16);
    const uint32x4_t quiet_nan = vorrq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(0x40));
    return vmovn_u32(vbslq_u32(vceqq_f32(a.v, a.v), rounded, quiet_nan));
  }
  template <class H>
  static VecF32 load(const H* p) {
    return widen(vld1_u16(reinterpret_cast<const uint16_t*>(p)), p);
  }
  template <class H>
  static void store(H* p, VecF32 a) {
    vst1_u16(reinterpret_cast<uint16_t*>(p), narrow(a, p));
  }
  template <class H>
  static void store_stream(H* p, VecF32 a) {
    store(p, a);
  }
  template <class H>
  static VecF32 load_tail(const H* p, int64_t n, float fill) {
    H bits[kWidth] = {};
    for (int64_t i = 0; i < n; ++i) bits[i] = p[i];
    float buf[kWidth];
    vst1q_f32(buf, widen(vld1_u16(reinterpret_cast<const uint16_t*>(bits)), p).v);
    for (int64_t i = n; i < kWidth; ++i) buf[i] = fill;
    return {vld1q_f32(buf)};
  }
  template <class H>
  static void store_tail(H* p, VecF32 a, int64_t n) {
    H bits[kWidth];
    vst1_u16(reinterpret_cast<uint16_t*>(bits), narrow(a, p));
    for (int64_t i = 0; i < n; ++i) p[i] = bits[i];
  }

  friend VecF32 operator+(VecF32 a, VecF32 b) { return {vaddq_f32(a.v, b.v)}; }
  friend VecF32 operator-(VecF32 a, VecF32 b) { return {vsubq_f32(a.v, b.v)}; }
  friend VecF32 operator*(VecF32 a, VecF32 b) { return {vmulq_f32(a.v, b.v)}; }
  friend VecF32 operator/(VecF32 a, VecF32 b) { return {vdivq_f32(a.v, b.v)}; }
  friend VecF32 fma(VecF32 a, VecF32 b, VecF32 c) { return {vfmaq_f32(c.v, a.v, b.v)}; }
  friend VecF32 min(VecF32 a, VecF32 b) { return {vminnmq_f32(a.v, b.v)}; }
  friend VecF32 max(VecF32 a, VecF32 b) { return {vmaxnmq_f32(a.v, b.v)}; }
  // 2^n from t = n + 127 + 1.5 * 2^23 (one_plus_exp_neg's rounding): the low mantissa bits shifted into the exponent.
  friend VecF32 pow2_of_rounded(VecF32 t) {
    return {vreinterpretq_f32_u32(vshlq_n_u32(vreinterpretq_u32_f32(t.v), 23))};
  }
  // Lane-wise double accumulators: a run's float partial sums widen and add in with no horizontal step, which
  // comes once, in acc_sum.
  struct Acc {
    float64x2_t lo, hi;
  };
  static Acc acc_zero() { return {vdupq_n_f64(0.0), vdupq_n_f64(0.0)}; }
  static void acc_add(Acc& acc, VecF32 a) {
    acc.lo = vaddq_f64(acc.lo, vcvt_f64_f32(vget_low_f32(a.v)));
    acc.hi = vaddq_f64(acc.hi, vcvt_high_f64_f32(a.v));
  }
  static double acc_sum(const Acc& acc) { return vaddvq_f64(vaddq_f64(acc.lo, acc.hi)); }
  // The W lane sums to p[0, W), lane by lane.
  static void acc_store(double* p, const Acc& acc) {
    vst1q_f64(p, acc.lo);
    vst1q_f64(p + 2, acc.hi);
  }
  // The sum of the lanes, in float: for a short run, whose few terms the float sum holds well enough.
  static float sum_lanes(VecF32 a) { return vaddvq_f32(a.v); }
  // Lane i of the result is lane i ^ stride of a (stride 1 or 2): a step of segment_sum's butterfly.
  static VecF32 swap_lanes(VecF32 a, int stride) {
    return stride == 1 ? VecF32{vrev64q_f32(a.v)} : VecF32{vextq_f32(a.v, a.v, 2)};
  }
  // Lane k holds lane k & ~(len - 1) of a: the first lane of its aligned run of len (a power of two).
  static VecF32 segment_first(VecF32 a, int64_t len) {
    switch (len) {
      case 1: return a;
      case 2: return {vtrn1q_f32(a.v, a.v)};
      default: return {vdupq_laneq_f32(a.v, 0)};
    }
  }
  // Lane k holds p[k / len] (len a power of two up to the width; p[0, W) must be readable, p[0, W / len) is used).
  static VecF32 spread(const float* p, int64_t len) {
    switch (len) {
      case 1: return {vld1q_f32(p)};
      case 2: return {vcombine_f32(vdup_n_f32(p[0]), vdup_n_f32(p[1]))};
      default: return {vld1q_dup_f32(p)};
    }
  }
  // Whether every lane lies in [lo, hi] (a NaN lane does not).
  static bool all_in(VecF32 a, float lo, float hi) {
    return vminvq_u32(vandq_u32(vcgeq_f32(a.v, vdupq_n_f32(lo)), vcleq_f32(a.v, vdupq_n_f32(hi)))) != 0;
  }
};

struct VecF64 {
  using Scalar = double;
  static constexpr int kWidth = 2;
  static constexpr int kRegisters = 32;  // architectural vector registers
  float64x2_t v;

  static VecF64 zero() { return {vdupq_n_f64(0.0)}; }
  static VecF64 broadcast(double a) { return {vdupq_n_f64(a)}; }
  static VecF64 load(const double* p) { return {vld1q_f64(p)}; }
  static void store(double* p, VecF64 a) { vst1q_f64(p, a.v); }
  static void store_stream(double* p, VecF64 a) { vst1q_f64(p, a.v); }
  static void stream_fence() {}
  static VecF64 load_tail(const double* p, int64_t n, double fill) {
    double buf[kWidth];
    for (int i = 0; i < kWidth; ++i) buf[i] = i < n ? p[i] : fill;
    return {vld1q_f64(buf)};
  }
  static void store_tail(double* p, VecF64 a, int64_t n) {
    double buf[kWidth];
    vst1q_f64(buf, a.v);
    for (int64_t i = 0; i < n; ++i) p[i] = buf[i];
  }

  friend VecF64 operator+(VecF64 a, VecF64 b) { return {vaddq_f64(a.v, b.v)}; }
  friend VecF64 operator-(VecF64 a, VecF64 b) { return {vsubq_f64(a.v, b.v)}; }
  friend VecF64 operator*(VecF64 a, VecF64 b) { return {vmulq_f64(a.v, b.v)}; }
  friend VecF64 operator/(VecF64 a, VecF64 b) { return {vdivq_f64(a.v, b.v)}; }
  friend VecF64 fma(VecF64 a, VecF64 b, VecF64 c) { return {vfmaq_f64(c.v, a.v, b.v)}; }
  friend VecF64 min(VecF64 a, VecF64 b) { return {vminnmq_f64(a.v, b.v)}; }
  friend VecF64 max(VecF64 a, VecF64 b) { return {vmaxnmq_f64(a.v, b.v)}; }
  // 2^n from t = n + 1023 + 1.5 * 2^52 (one_plus_exp_neg's rounding).
  friend VecF64 pow2_of_rounded(VecF64 t) {
    return {vreinterpretq_f64_u64(vshlq_n_u64(vreinterpretq_u64_f64(t.v), 52))};
  }
  struct Acc {
    float64x2_t v;
  };
  static Acc acc_zero() { return {vdupq_n_f64(0.0)}; }
  static void acc_add(Acc& acc, VecF64 a) { acc.v = vaddq_f64(acc.v, a.v); }
  static double acc_sum(const Acc& acc) { return vaddvq_f64(acc.v); }
  static void acc_store(double* p, const Acc& acc) { vst1q_f64(p, acc.v); }
  static double sum_lanes(VecF64 a) { return vaddvq_f64(a.v); }
  static VecF64 swap_lanes(VecF64 a, int) { return {vextq_f64(a.v, a.v, 1)}; }  // stride 1
  static VecF64 segment_first(VecF64 a, int64_t len) { return len == 1 ? a : VecF64{vdupq_laneq_f64(a.v, 0)}; }
  static VecF64 spread(const double* p, int64_t len) { return len == 1 ? VecF64{vld1q_f64(p)} : VecF64{vld1q_dup_f64(p)}; }
  static bool all_in(VecF64 a, double lo, double hi) {
    const uint64x2_t in = vandq_u64(vcgeq_f64(a.v, vdupq_n_f64(lo)), vcleq_f64(a.v, vdupq_n_f64(hi)));
    return vminvq_u32(vreinterpretq_u32_u64(in)) != 0;
  }
};

}  // namespace neon
}  // namespace groupnorm
