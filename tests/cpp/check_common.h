// check_common.h — what tests/cpp/kernel_check.cpp and tests/cuda_emu/cuda_emu_check.cpp share: dtype, data and
// message helpers, the long double reference statistics and forward output, and the float16/bfloat16 reference,
// which rounds to nearest even independently of half.h and judges a 16-bit output with a slack around midpoints.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "groupnorm/half.h"

namespace groupnorm_check {

using groupnorm::BFloat16;
using groupnorm::Half;

// The 16-bit storage types, whose outputs are judged by their rounding.
template <class T>
constexpr bool is_half_v = std::is_same<T, Half>::value || std::is_same<T, BFloat16>::value;

// Exact value of a stored element, and a double rounded (once more for 16-bit types, via float) to storage.
template <class T>
long double value_of(T v) {
  return (long double)groupnorm::widen(v);
}
template <class T>
T from_double(double d) {
  if constexpr (std::is_same<T, Half>::value) return groupnorm::narrow_half(float(d));
  else if constexpr (std::is_same<T, BFloat16>::value) return groupnorm::narrow_bfloat16(float(d));
  else return T(d);
}
// T's quiet NaN: an output's poison before a call, so that an unwritten element fails.
template <class T>
T quiet_nan() {
  if constexpr (std::is_same<T, Half>::value) return Half{0x7e00};
  else if constexpr (std::is_same<T, BFloat16>::value) return BFloat16{0x7fc0};
  else return std::numeric_limits<T>::quiet_NaN();
}
// A finite value no kernel computes here: the guards around an output, or a second run's poison (so that an
// unwritten element differs between runs).
template <class T>
T sentinel() {
  const uint64_t bits = sizeof(T) == 2 ? 0xC4A5u : sizeof(T) == 4 ? 0xC4A5A5A5u : 0xC0DEADBEEFCAFE42ull;
  T value;
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

// count values offset + spread * N(0,1), each rounded to T.
template <class T>
std::vector<T> normal_data(std::mt19937_64& rng, int64_t count, double offset, double spread) {
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<T> v(static_cast<size_t>(count));
  for (T& e : v) e = from_double<T>(offset + spread * normal(rng));
  return v;
}

// count values U(lo, hi), each rounded to T.
template <class T>
std::vector<T> uniform_data(std::mt19937_64& rng, int64_t count, double lo, double hi) {
  std::uniform_real_distribution<double> uniform(lo, hi);
  std::vector<T> v(static_cast<size_t>(count));
  for (T& e : v) e = from_double<T>(uniform(rng));
  return v;
}

// printf into a string (a failure message; one longer than the buffer is cut short).
inline std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
inline std::string format(const char* fmt, ...) {
  char buf[2048];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, args);
  va_end(args);
  return buf;
}

// The master seed: --seed=N, else $GROUPNORM_CHECK_SEED, else a random one.
inline uint64_t choose_seed(int argc, char** argv) {
  for (int i = 1; i < argc; ++i)
    if (std::strncmp(argv[i], "--seed=", 7) == 0) return std::strtoull(argv[i] + 7, nullptr, 10);
  if (const char* env = std::getenv("GROUPNORM_CHECK_SEED")) return std::strtoull(env, nullptr, 10);
  std::random_device device;
  return (uint64_t(device()) << 32) ^ device();
}

// ---- long double references -------------------------------------------------------------------------------

// A shape named as in the paper (N samples, C channels in G groups of D = C / G, HxW values a channel) and its
// layout: where element i of channel c of sample n lies, channels-first (NCHW) or channels-last (NHWC).
struct ShapeLayout {
  int64_t N, C, G, HxW;
  bool channels_last;
  int64_t size() const { return N * C * HxW; }
  int64_t offset(int64_t n, int64_t c, int64_t i) const {
    return channels_last ? (n * HxW + i) * C + c : (n * C + c) * HxW + i;
  }
};

// Per-(n, group) mean and 1/sqrt(var + eps) in long double, two-pass; population variance.
struct ReferenceStats {
  std::vector<long double> mean, rstd;  // [N, G]
};

template <class T>
ReferenceStats reference_stats(const ShapeLayout& s, const T* x, double eps) {
  const int64_t D = s.C / s.G;
  ReferenceStats ref;
  ref.mean.resize(size_t(s.N * s.G));
  ref.rstd.resize(size_t(s.N * s.G));
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t g = 0; g < s.G; ++g) {
      // Summed relative to the group's first value: exact for a constant group, whose long double sum of 24007 equal
      // values was off by 1e-15 of them (y = 2.5e-13 where the kernels' exact 0 is right, at rstd = 316).
      const long double first = s.HxW > 0 && D > 0 ? value_of(x[s.offset(n, g * D, 0)]) : 0.0L;
      long double sum = 0;
      for (int64_t c = g * D; c < (g + 1) * D; ++c)
        for (int64_t i = 0; i < s.HxW; ++i) sum += value_of(x[s.offset(n, c, i)]) - first;
      const long double count = (long double)(D * s.HxW), mean = first + sum / count;
      long double m2 = 0;
      for (int64_t c = g * D; c < (g + 1) * D; ++c)
        for (int64_t i = 0; i < s.HxW; ++i) {
          const long double d = value_of(x[s.offset(n, c, i)]) - mean;
          m2 += d * d;
        }
      ref.mean[size_t(n * s.G + g)] = mean;
      ref.rstd[size_t(n * s.G + g)] = 1.0L / std::sqrt(m2 / count + (long double)eps);
    }
  return ref;
}

inline long double sigmoid(long double y) { return 1.0L / (1.0L + std::exp(-y)); }

// The forward's reference output y = act(z * w + b), z = (x - mean) * rstd, and, per element, the scales its
// rounding error is judged against.
struct ReferenceOutput {
  std::vector<long double> value;
  long double max_abs = 0;  // max |value|: the scale of a float/double output's tolerance
  // |act'(y)| * terms: what y = z * w + b inherently loses to rounding when the bias cancels the normalised term,
  // a case the plain max|y_ref| scale cannot absorb.
  std::vector<long double> condition;
  // |z * w| + |w| / 4 + |b|: the scale of what float compute knows y to (the slack of a 16-bit output's
  // rounding). |w| / 4: z itself is known only to a few float ulps absolute (the mean to a few ulps of the
  // std), which matters where z is near 0.
  std::vector<long double> terms;
};

// With SiLU or without; a null weight (bias) is 1 (0). x of T, weight and bias of P.
template <class T, class P>
ReferenceOutput reference_output(const ShapeLayout& s, bool silu, const T* x, const P* weight, const P* bias,
                                 const ReferenceStats& ref) {
  const int64_t D = s.C / s.G;
  ReferenceOutput out;
  out.value.resize(size_t(s.size()));
  out.condition.resize(size_t(s.size()));
  out.terms.resize(size_t(s.size()));
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t c = 0; c < s.C; ++c) {
      const size_t ng = size_t(n * s.G + c / D);
      const long double w = weight ? value_of(weight[c]) : 1.0L, scale = ref.rstd[ng] * w;
      const long double shift = bias ? value_of(bias[c]) : 0.0L;
      for (int64_t i = 0; i < s.HxW; ++i) {
        const size_t k = size_t(s.offset(n, c, i));
        const long double zw = (value_of(x[k]) - ref.mean[ng]) * scale;
        long double y = zw + shift, slope = 1.0L;
        if (silu) {
          const long double sg = sigmoid(y);
          slope = std::fabs(sg * (1.0L + y * (1.0L - sg)));
          y *= sg;
        }
        out.value[k] = y;
        out.max_abs = std::fmax(out.max_abs, std::fabs(y));
        out.terms[k] = std::fabs(zw) + std::fabs(w) / 4 + std::fabs(shift);
        out.condition[k] = slope * out.terms[k];
      }
    }
  return out;
}

// ---- float16 / bfloat16 reference ---------------------------------------------------------------------------

// The 16-bit formats as numbers: significand bits after the point, least normal exponent, the bits of +inf.
template <class H>
struct HalfFormat {
  static constexpr bool kBinary16 = std::is_same<H, Half>::value;
  static constexpr int kMantissaBits = kBinary16 ? 10 : 7;
  static constexpr int kMinExponent = kBinary16 ? -14 : -126;
  static constexpr uint16_t kInfBits = kBinary16 ? 0x7c00 : 0x7f80;
};

// r rounded to nearest, ties to even, in H: the bits (a NaN r gives the quiet NaN). Independent of half.h: the
// magnitude is counted in quanta of its binade (subnormals share the least normal binade's quantum), the count
// rounded by nearbyint in the default mode, and the bits are (binade - least) * 2^mantissa + count, which
// carries into the exponent and past the largest finite value into inf by itself. In double, which holds every
// float exactly and a long double reference far closer than the slack it is judged with (and is fast on
// targets where long double is software quad).
template <class H>
uint16_t round_to_bits(double r) {
  using F = HalfFormat<H>;
  if (std::isnan(r)) return quiet_nan<H>().bits;
  const uint16_t sign = std::signbit(r) ? 0x8000 : 0;
  const double magnitude = std::fabs(r);
  if (magnitude == 0) return sign;
  if (std::isinf(magnitude)) return uint16_t(sign | F::kInfBits);
  int exponent;
  std::frexp(magnitude, &exponent);  // magnitude in [2^(exponent-1), 2^exponent)
  const int binade = std::max(exponent - 1, F::kMinExponent);
  if (binade > 200) return uint16_t(sign | F::kInfBits);
  const double count = std::nearbyint(std::ldexp(magnitude, F::kMantissaBits - binade));  // scaling is exact
  const double bits = double(binade - F::kMinExponent) * (1 << F::kMantissaBits) + count;
  return uint16_t(sign | uint16_t(std::fmin(bits, double(F::kInfBits))));
}

// Position of a non-NaN 16-bit value on the number line in ulps: -0 and +0 are both 0, inf follows the largest.
inline int ordinal(uint16_t bits) { return (bits & 0x8000) ? -int(bits & 0x7fff) : int(bits); }
// Whether bits is a NaN of the format whose +inf is inf_bits.
inline bool is_nan_bits(uint16_t bits, uint16_t inf_bits) { return (bits & 0x7fff) > inf_bits; }

// How a 16-bit output compares with its rounded reference (check_rounding).
struct RoundingCheck {
  int64_t bad = 0, first_bad = -1;  // outside the slack, and the index of the first such value
  int64_t off_nearest = 0;          // within the slack but not the nearest
};

// A 16-bit output o passes when it lies between the reference rounded to nearest from r - slack and from
// r + slack, slack = slack_per_term * terms: so it is the nearest-even rounding of r wherever r lies farther than
// the slack from a rounding midpoint, and one ulp off at most where it lies closer (more only where the slack
// spans several ulps: results near 0 from cancelling terms). NaN (unwritten poison) fails. out holds ref.size().
template <class H>
RoundingCheck check_rounding(const H* out, const std::vector<long double>& ref, const std::vector<long double>& terms,
                             long double slack_per_term) {
  RoundingCheck result;
  for (size_t k = 0; k < ref.size(); ++k) {
    const double r = double(ref[k]), slack = double(slack_per_term * terms[k]);
    const uint16_t bits = out[k].bits;
    if (bits == round_to_bits<H>(r)) continue;
    if (!is_nan_bits(bits, HalfFormat<H>::kInfBits) && ordinal(round_to_bits<H>(r - slack)) <= ordinal(bits) &&
        ordinal(bits) <= ordinal(round_to_bits<H>(r + slack)))
      ++result.off_nearest;
    else if (result.bad++ == 0)
      result.first_bad = int64_t(k);
  }
  return result;
}

// The failure message of a check_rounding with bad values: the first one, its nearest rounding and its slack.
template <class H>
std::string rounding_failure(const std::string& label, const char* name, const H* out,
                             const std::vector<long double>& ref, const std::vector<long double>& terms,
                             long double slack_per_term, const RoundingCheck& result) {
  const size_t k = size_t(result.first_bad);
  return format("%s: %s has %lld of %zu values off the rounded reference, the first at index %zu: 0x%04x (%.9Le) "
                "vs nearest 0x%04x, reference %.12Le, slack %.3Le",
                label.c_str(), name, (long long)result.bad, ref.size(), k, out[k].bits, value_of(out[k]),
                round_to_bits<H>(double(ref[k])), ref[k], slack_per_term * terms[k]);
}

}  // namespace groupnorm_check
