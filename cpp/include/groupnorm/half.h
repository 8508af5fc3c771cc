// half.h — the 16-bit storage types (IEEE binary16 and bfloat16) and their scalar conversions to float.
// Narrowing rounds to nearest, ties to even, and keeps NaN a (quiet) NaN; nothing is ever truncated.
// The functions are `static`: every ISA translation unit gets its own copy, compiled with its own flags, so no
// AVX-512 code can stand in for the scalar level's conversion at link time.
#pragma once

#include <cstdint>
#include <cstring>

namespace groupnorm {

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

static inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

static inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

static inline float widen(float f) { return f; }
static inline double widen(double d) { return d; }
static inline float widen(BFloat16 h) { return bits_float(uint32_t(h.bits) << 16); }

static inline float widen(Half h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  const uint32_t exponent = (h.bits >> 10) & 0x1fu, mantissa = h.bits & 0x3ffu;
  if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf, NaN
  if (exponent != 0) return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  const float magnitude = float(mantissa) * 0x1p-24f;  // subnormal or zero: exact in float
  return sign ? -magnitude : magnitude;
}

// float -> bfloat16: add half an ulp of the kept part (less one, plus its lowest bit: ties to even), drop 16 bits.
static inline BFloat16 narrow_bfloat16(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x0040u)};  // NaN stays a quiet NaN
  return {uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

// float -> binary16, round to nearest even; overflow gives inf, tiny values go subnormal or to zero.
static inline Half narrow_half(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t magnitude = u & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return {uint16_t(sign | 0x7e00u | ((magnitude >> 13) & 0x3ffu))};
  if (magnitude >= 0x477ff000u) return {uint16_t(sign | 0x7c00u)};  // rounds past 65504: inf
  if (magnitude < 0x38800000u) {  // below 2^-14: a subnormal, counted in units of 2^-24, rounded half-even
    const float scaled = bits_float(magnitude) * 0x1p24f;  // exact: a power-of-two scale
    const uint32_t whole = uint32_t(scaled);
    const float rest = scaled - float(whole);
    const uint32_t rounded = whole + ((rest > 0.5f || (rest == 0.5f && (whole & 1u))) ? 1u : 0u);
    return {uint16_t(sign | rounded)};
  }
  const uint32_t rebiased = magnitude - (112u << 23);  // exponent 127-bias to 15-bias
  return {uint16_t(sign | ((rebiased + 0xfffu + ((rebiased >> 13) & 1u)) >> 13))};
}

}  // namespace groupnorm
