// vec/neon.h — Vec<T> on AArch64 Advanced SIMD: 4 float or 2 double lanes in a q register.
// Tails go through a small stack buffer (the scalar-epilogue rule), as on AVX2.
// Compiled only on aarch64, where NEON is part of the base ISA and needs no extra flag.
#pragma once

#include <arm_neon.h>
#include <cstdint>

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

  friend VecF32 operator+(VecF32 a, VecF32 b) { return {vaddq_f32(a.v, b.v)}; }
  friend VecF32 operator-(VecF32 a, VecF32 b) { return {vsubq_f32(a.v, b.v)}; }
  friend VecF32 operator*(VecF32 a, VecF32 b) { return {vmulq_f32(a.v, b.v)}; }
  friend VecF32 operator/(VecF32 a, VecF32 b) { return {vdivq_f32(a.v, b.v)}; }
  friend VecF32 fma(VecF32 a, VecF32 b, VecF32 c) { return {vfmaq_f32(c.v, a.v, b.v)}; }
  friend VecF32 min(VecF32 a, VecF32 b) { return {vminnmq_f32(a.v, b.v)}; }
  friend VecF32 max(VecF32 a, VecF32 b) { return {vmaxnmq_f32(a.v, b.v)}; }
  friend VecF32 round_nearest(VecF32 a) { return {vrndnq_f32(a.v)}; }
  friend VecF32 ldexp_int(VecF32 a, VecF32 n) {
    const int32x4_t bits = vshlq_n_s32(vaddq_s32(vcvtnq_s32_f32(n.v), vdupq_n_s32(127)), 23);
    return {vmulq_f32(a.v, vreinterpretq_f32_s32(bits))};
  }
  // The lanes' sum, widened to double first so 4 large partial sums cannot overflow float.
  double reduce_sum() const {
    return vaddvq_f64(vaddq_f64(vcvt_f64_f32(vget_low_f32(v)), vcvt_high_f64_f32(v)));
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
  friend VecF64 round_nearest(VecF64 a) { return {vrndnq_f64(a.v)}; }
  friend VecF64 ldexp_int(VecF64 a, VecF64 n) {
    const int64x2_t bits = vshlq_n_s64(vaddq_s64(vcvtnq_s64_f64(n.v), vdupq_n_s64(1023)), 52);
    return {vmulq_f64(a.v, vreinterpretq_f64_s64(bits))};
  }
  double reduce_sum() const { return vaddvq_f64(v); }
};

}  // namespace neon
}  // namespace groupnorm
