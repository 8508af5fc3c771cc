// fuzz_entry_points.cpp — libFuzzer target for group_norm_forward and group_norm_backward (and isa_select,
// set_num_threads). The bytes pick an ISA level, dtype, layout, activation, shape (now and then an invalid
// descriptor), eps, thread counts, optional outputs, in place or not, buffer alignments and the data itself
// (NaN, inf, subnormal, huge). Every buffer is a heap block of exactly its size, so ASan flags any access
// outside it. Checked: status codes, untouched inputs, bitwise equality across 1 and 2 threads and in place, a
// long double reference on finite groups of moderate range, NaN throughout groups holding a NaN or inf. A failed
// check prints what it saw and aborts, so libFuzzer keeps the input.
#include <sanitizer/asan_interface.h>

#include <climits>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "groupnorm/groupnorm.h"
#include "groupnorm/half.h"

namespace {

using groupnorm::Activation;
using groupnorm::BFloat16;
using groupnorm::DType;
using groupnorm::Half;
using groupnorm::Isa;
using groupnorm::Layout;
using groupnorm::Problem;
using groupnorm::Status;

using Real = long double;

const char* g_context = "";  // what the current input is doing, for the failure message
char g_case[320] = "";       // the decoded case, for the failure message

[[noreturn]] __attribute__((format(printf, 1, 2))) void fail(const char* fmt, ...) {
  std::fprintf(stderr, "\nfuzz_entry_points: CHECK FAILED (%s; %s): ", g_context, g_case);
  va_list args;
  va_start(args, fmt);
  std::vfprintf(stderr, fmt, args);
  va_end(args);
  std::fprintf(stderr, "\n");
  std::abort();
}

// The fuzz input as a byte stream; past its end, a xorshift stream seeded by the input's hash, so that a short
// input still fills large buffers, deterministically.
class ByteStream {
 public:
  ByteStream(const uint8_t* data, size_t size) : data_(data), size_(size) {
    uint64_t hash = 0xcbf29ce484222325ull ^ size;
    for (size_t i = 0; i < size; ++i) hash = (hash ^ data[i]) * 0x100000001b3ull;
    state_ = hash | 1;
  }
  uint8_t byte() {
    if (pos_ < size_) return data_[pos_++];
    state_ ^= state_ << 13;
    state_ ^= state_ >> 7;
    state_ ^= state_ << 17;
    return uint8_t(state_ >> 24);
  }
  uint64_t bits(int bytes) {
    uint64_t u = 0;
    for (int i = 0; i < bytes; ++i) u = (u << 8) | byte();
    return u;
  }
  template <class E>
  E pick(std::initializer_list<E> options) {
    return options.begin()[byte() % options.size()];
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
  uint64_t state_;
};

// ---------------------------------------------------------------------------------------------------------
// Storage types: S is the tensor element, P the parameter / statistics type (float for the 16-bit types).

template <class S>
struct Traits;
template <>
struct Traits<float> {
  using P = float;
  static constexpr DType kDType = DType::kFloat32;
  static constexpr Real kUnit = 0x1p-24L;      // unit roundoff of the compute type
  static constexpr Real kStoreUlp = 0;         // extra rounding of the stored output, relative
  static constexpr Real kFloor = 0x1p-80L;     // absolute slack: subnormal results of the compute type
  // The compute type's smallest subnormal: a product dy * (x - mean) below it in magnitude (tiny dy with a tiny
  // spread and eps = 0, where rstd amplifies it) is rounded by up to half of it, whatever its size.
  static constexpr Real kProductStep = 0x1p-149L;
  static constexpr Real kModerate = 0x1p60L;   // |x|, rstd and |dy| up to which results are checked
  static constexpr Real kLargest = 0x1p100L;   // |y_ref| past which an output is not checked
};
template <>
struct Traits<double> {
  using P = double;
  static constexpr DType kDType = DType::kFloat64;
  static constexpr Real kUnit = 0x1p-53L;
  static constexpr Real kStoreUlp = 0;
  static constexpr Real kFloor = 0x1p-500L;
  static constexpr Real kProductStep = 0x1p-1074L;
  static constexpr Real kModerate = 0x1p400L;
  static constexpr Real kLargest = 0x1p900L;
};
template <>
struct Traits<Half> {
  using P = float;
  static constexpr DType kDType = DType::kFloat16;
  static constexpr Real kUnit = 0x1p-24L;
  static constexpr Real kStoreUlp = 0x1p-10L;  // one binary16 ulp
  static constexpr Real kFloor = 0x1p-24L;     // one binary16 subnormal step
  static constexpr Real kProductStep = 0x1p-149L;  // the compute type's (float's)
  static constexpr Real kModerate = 0x1p60L;
  static constexpr Real kLargest = 65000.0L;   // below the binary16 overflow threshold, with rounding room
};
template <>
struct Traits<BFloat16> {
  using P = float;
  static constexpr DType kDType = DType::kBFloat16;
  static constexpr Real kUnit = 0x1p-24L;
  static constexpr Real kStoreUlp = 0x1p-7L;   // one bfloat16 ulp
  static constexpr Real kFloor = 0x1p-80L;
  static constexpr Real kProductStep = 0x1p-149L;  // the compute type's (float's)
  static constexpr Real kModerate = 0x1p60L;
  static constexpr Real kLargest = 0x1p100L;
};

Real value_of(float v) { return v; }
Real value_of(double v) { return v; }
Real value_of(Half v) { return groupnorm::widen(v); }
Real value_of(BFloat16 v) { return groupnorm::widen(v); }

template <class S>
S from_double(double d) {
  if constexpr (std::is_same<S, Half>::value) return groupnorm::narrow_half(float(d));
  else if constexpr (std::is_same<S, BFloat16>::value) return groupnorm::narrow_bfloat16(float(d));
  else return S(d);
}

template <class S>
S from_bits(uint64_t bits) {
  S s;
  std::memcpy(&s, &bits, sizeof(S));  // little-endian: the low bytes
  return s;
}

bool is_nan(Real v) { return std::isnan(v); }

// A heap block of exactly `count` elements of E, starting `offset` elements after a poisoned prefix (to vary
// the alignment the kernels see); reads and writes past the end are ASan errors. Poisoning works in 8-byte
// granules, so a prefix that is not a multiple of 8 bytes leaves the bytes just before the data unguarded.
template <class E>
class Buffer {
 public:
  Buffer() = default;
  Buffer(size_t count, size_t offset) : count_(count), prefix_(offset * sizeof(E)) {
    block_ = static_cast<unsigned char*>(std::malloc(prefix_ + count * sizeof(E)));
    if (!block_) fail("malloc of %zu bytes", prefix_ + count * sizeof(E));
    ASAN_POISON_MEMORY_REGION(block_, prefix_);
  }
  Buffer(Buffer&& other) noexcept { *this = std::move(other); }
  Buffer& operator=(Buffer&& other) noexcept {
    std::swap(block_, other.block_);
    std::swap(count_, other.count_);
    std::swap(prefix_, other.prefix_);
    return *this;
  }
  ~Buffer() {
    if (!block_) return;
    ASAN_UNPOISON_MEMORY_REGION(block_, prefix_);
    std::free(block_);
  }
  E* data() const { return block_ ? reinterpret_cast<E*>(block_ + prefix_) : nullptr; }
  size_t size() const { return count_; }
  E& operator[](size_t i) const { return data()[i]; }
  void fill_bytes(unsigned char value) {
    if (count_) std::memset(data(), value, count_ * sizeof(E));
  }
  Buffer copy(size_t offset = 0) const {
    Buffer out(count_, offset);
    if (count_) std::memcpy(out.data(), data(), count_ * sizeof(E));
    return out;
  }

 private:
  unsigned char* block_ = nullptr;
  size_t count_ = 0;
  size_t prefix_ = 0;
};

// The first element at which two buffers differ bitwise, or -1. Any two NaNs count as equal: which operand's
// NaN an x86 instruction returns depends on the operand order the compiler encoded (vfmadd132 / 213 / 231), so
// a NaN's sign and payload may differ between two code paths (an aligned body, a misaligned head).
template <class E>
int64_t first_difference(const Buffer<E>& a, const Buffer<E>& b, bool nans_equal) {
  if (a.size() != b.size()) fail("harness: comparing buffers of %zu and %zu elements", a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(E)) != 0 &&
        !(nans_equal && is_nan(value_of(a[i])) && is_nan(value_of(b[i]))))
      return int64_t(i);
  return -1;
}

// Results of two calls that must agree: the same bits, or NaN both.
template <class E>
void expect_same_values(const Buffer<E>& a, const Buffer<E>& b, const char* what) {
  const int64_t i = first_difference(a, b, true);
  if (i >= 0) fail("%s differs at element %lld: %.17Lg vs %.17Lg", what, (long long)i, value_of(a[size_t(i)]),
                   value_of(b[size_t(i)]));
}

// A buffer a call must not write: the same bits as its copy from before.
template <class E>
void expect_unchanged(const Buffer<E>& now, const Buffer<E>& before, const char* what) {
  const int64_t i = first_difference(now, before, false);
  if (i >= 0) fail("%s was written at element %lld: %.17Lg, was %.17Lg", what, (long long)i,
                   value_of(now[size_t(i)]), value_of(before[size_t(i)]));
}

// ---------------------------------------------------------------------------------------------------------
// Data values decoded from the bytes.

// Values that break naive code: NaNs, infinities, the extremes of double, zero of both signs. Cast to S they
// become S's own infinities, extremes and subnormals or zeros.
constexpr double kSpecials[] = {
    std::numeric_limits<double>::quiet_NaN(), -std::numeric_limits<double>::quiet_NaN(),
    std::numeric_limits<double>::infinity(),  -std::numeric_limits<double>::infinity(),
    3.4028234663852886e38,                   -3.4028234663852886e38,
    1.401298464324817e-45,                   -1.1754943508222875e-38,
    65504.0,                                 6.103515625e-05,
    5.960464477539063e-08,                   1e30,
    -1e300,                                  4.9406564584124654e-324,
    0.0,                                     -0.0,
};

// How one buffer's values are made: raw bits (anything at all), or offset + step * int8 per byte with, in
// `specials` mode, byte 0x80 followed by an index into kSpecials.
struct ValueCode {
  bool raw = false;
  bool specials = false;
  double offset = 0.0;
  double step = 1.0;
};

ValueCode decode_value_code(ByteStream& in) {
  ValueCode code;
  const uint8_t kind = in.byte();
  code.raw = kind % 8 == 0;
  code.specials = kind % 8 == 1 || kind % 8 == 2;
  code.offset = in.pick<double>({0.0, 0.0, 1.0, -3.0, 1000.5, 1e6, -1e8, 0x1p40, 1e-30, 60000.0});
  const int exponent = in.byte() % 48;
  code.step = exponent == 47 ? 0.0 : std::ldexp(1.0, exponent - 30);  // 0: a constant buffer
  return code;
}

template <class S>
S decode_value(ByteStream& in, const ValueCode& code) {
  if (code.raw) return from_bits<S>(in.bits(int(sizeof(S))));
  const uint8_t b = in.byte();
  if (code.specials && b == 0x80) return from_double<S>(kSpecials[in.byte() % (sizeof(kSpecials) / sizeof(double))]);
  return from_double<S>(code.offset + code.step * double(int8_t(b)));
}

template <class S>
Buffer<S> decode_buffer(ByteStream& in, size_t count, size_t offset) {
  const ValueCode code = decode_value_code(in);
  Buffer<S> out(count, offset);
  for (size_t i = 0; i < count; ++i) out[i] = decode_value<S>(in, code);
  return out;
}

// Weight or bias: multiples of 1/32 in [-4, 4), exact in every type; with `specials`, byte 0x80 is a special.
template <class P>
Buffer<P> decode_params(ByteStream& in, size_t count, bool specials) {
  Buffer<P> out(count, in.byte() % 4);
  for (size_t i = 0; i < count; ++i) {
    const uint8_t b = in.byte();
    out[i] = specials && b == 0x80 ? P(kSpecials[in.byte() % 4]) : P(double(int8_t(b)) / 32.0);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// The case under test.

struct Case {
  Problem p;
  bool weight = false, bias = false;            // forward and backward inputs
  bool mean_out = false, rstd_out = false;      // forward outputs
  bool dweight = false, dbias = false;          // backward outputs
  bool special_params = false;                  // weight / bias may hold NaN or inf
  int forward_in_place = 0;                     // 1: y is x
  int backward_in_place = 0;                    // 1: dx is dy, 2: dx is x
  bool null_when_empty = false;                 // zero-size buffers passed as nullptr
  size_t offset_in = 0, offset_out = 0;         // alignment offsets, in elements
  int64_t D() const { return p.C / p.G; }
  int64_t elements() const { return p.N * p.C * p.HxW; }
  int64_t groups() const { return p.N * p.G; }
  int64_t index(int64_t n, int64_t c, int64_t i) const {
    return p.layout == Layout::kChannelsFirst ? (n * p.C + c) * p.HxW + i : (n * p.HxW + i) * p.C + c;
  }
};

template <class E>
E* pointer(const Case& k, const Buffer<E>& b) {
  return b.size() == 0 && k.null_when_empty ? nullptr : b.data();
}

Problem with_threads(Problem p, int threads) {
  p.num_threads = threads;
  return p;
}

// ---------------------------------------------------------------------------------------------------------
// Reference checks.

// Per (n, group): whether the group is checked against the reference, and its long double statistics. The
// mean is kept as shift + offset, shift one sample of the group: x - mean = (x - shift) - offset then stays
// accurate to the group's spread, however far the mean lies from 0 (long double's 2^-64 of the mean alone,
// times rstd, can exceed the double kernels' error).
struct GroupRef {
  bool finite = true;    // every x of the group is finite
  bool checked = false;  // finite, moderate x and rstd, finite parameters: compared with the reference
  Real shift = 0, offset = 0, mean = 0, rstd = 0, sigma = 0;
  Real centered(Real v) const { return (v - shift) - offset; }
};

// The mean of a group's values (given by `value(i)`, i < M) as shift + offset, into r.
template <class Value>
void reference_mean(GroupRef& r, int64_t M, Value value) {
  r.shift = value(0);
  Real sum = 0;
  for (int64_t i = 0; i < M; ++i) sum += value(i) - r.shift;
  r.offset = sum / Real(M);
  r.mean = r.shift + r.offset;
}

template <class S>
std::vector<GroupRef> reference_groups(const Case& k, const Buffer<S>& x, const typename Traits<S>::P* w,
                                       const typename Traits<S>::P* b) {
  const int64_t D = k.D(), M = D * k.p.HxW;
  std::vector<GroupRef> refs(size_t(k.groups()));
  for (int64_t n = 0; n < k.p.N; ++n)
    for (int64_t g = 0; g < k.p.G; ++g) {
      GroupRef& r = refs[size_t(n * k.p.G + g)];
      Real largest = 0;
      bool params_finite = true;
      for (int64_t c = g * D; c < (g + 1) * D; ++c) {
        if ((w && !std::isfinite(w[c])) || (b && !std::isfinite(b[c]))) params_finite = false;
        for (int64_t i = 0; i < k.p.HxW; ++i) {
          const Real v = value_of(x[size_t(k.index(n, c, i))]);
          if (!std::isfinite(v)) r.finite = false;
          largest = std::fmax(largest, std::fabs(v));
        }
      }
      if (!r.finite || M == 0) continue;
      auto value = [&](int64_t j) { return value_of(x[size_t(k.index(n, g * D + j / k.p.HxW, j % k.p.HxW))]); };
      reference_mean(r, M, value);
      Real m2 = 0;
      for (int64_t j = 0; j < M; ++j) {
        const Real d = r.centered(value(j));
        m2 += d * d;
      }
      r.sigma = std::sqrt(m2 / Real(M));
      r.rstd = 1 / std::sqrt(m2 / Real(M) + Real(k.p.eps));
      r.checked = params_finite && largest <= Traits<S>::kModerate && r.rstd <= Traits<S>::kModerate;
    }
  return refs;
}

// Relative error the kernels may make on a group of M elements, as a multiple of the scale of the terms: float
// runs of at most ~33 additions give sums good to ~35 units; the variance amplifies that ~7x (the shift lies
// within 2 sigma), the rstd halves it; double accumulators add one unit of double per element at worst.
template <class S>
Real relative_bound(int64_t M) {
  return 512 * Traits<S>::kUnit + 16 * Real(M) * 0x1p-53L;
}

// y against the reference on checked groups; NaN throughout groups holding a NaN or inf; the statistics.
template <class S>
void check_forward_values(const Case& k, const Buffer<S>& x, const typename Traits<S>::P* w,
                          const typename Traits<S>::P* b, const Buffer<S>& y, const typename Traits<S>::P* mean,
                          const typename Traits<S>::P* rstd) {
  using T = Traits<S>;
  const int64_t D = k.D(), M = D * k.p.HxW;
  const bool silu = k.p.activation == Activation::kSilu;
  const std::vector<GroupRef> refs = reference_groups<S>(k, x, w, b);
  const Real rel = relative_bound<S>(M);
  for (int64_t n = 0; n < k.p.N; ++n)
    for (int64_t g = 0; g < k.p.G; ++g) {
      const int64_t ng = n * k.p.G + g;
      const GroupRef& r = refs[size_t(ng)];
      if (M == 0 || !r.finite) {  // no finite statistics: NaN everywhere
        if (rstd && !is_nan(rstd[ng])) fail("group %lld: rstd %.9g, want NaN (empty or non-finite group)",
                                            (long long)ng, double(rstd[ng]));
        if (M == 0 && mean && !is_nan(mean[ng]))
          fail("group %lld: mean %.9g of an empty group, want NaN", (long long)ng, double(mean[ng]));
        for (int64_t c = g * D; c < (g + 1) * D; ++c)
          for (int64_t i = 0; i < k.p.HxW; ++i) {
            const int64_t e = k.index(n, c, i);
            if (!is_nan(value_of(y[size_t(e)])))
              fail("y[%lld] = %.9Lg in group %lld, which holds a NaN or inf: want NaN", (long long)e,
                   value_of(y[size_t(e)]), (long long)ng);
          }
        continue;
      }
      if (!r.checked) continue;
      if (mean) {
        const Real tol = rel * 4 * r.sigma + T::kUnit * std::fabs(r.mean) + T::kFloor;
        if (!(std::fabs(Real(mean[ng]) - r.mean) <= tol))
          fail("group %lld: mean %.17g, reference %.17Lg (sigma %.3Lg, tolerance %.3Lg)", (long long)ng,
               double(mean[ng]), r.mean, r.sigma, tol);
      }
      if (rstd) {
        const Real tol = rel * r.rstd + T::kFloor;
        if (!(std::fabs(Real(rstd[ng]) - r.rstd) <= tol))
          fail("group %lld: rstd %.17g, reference %.17Lg (tolerance %.3Lg)", (long long)ng, double(rstd[ng]),
               r.rstd, tol);
      }
      for (int64_t c = g * D; c < (g + 1) * D; ++c) {
        const Real wc = w ? Real(w[c]) : 1, bc = b ? Real(b[c]) : 0;
        for (int64_t i = 0; i < k.p.HxW; ++i) {
          const int64_t e = k.index(n, c, i);
          const Real xhat = r.centered(value_of(x[size_t(e)])) * r.rstd;
          const Real z = xhat * wc + bc;
          const Real want = silu ? z / (1 + std::exp(-z)) : z;
          const Real scale = std::fabs(wc) * (std::fabs(xhat) + 1) + std::fabs(bc);
          // SiLU: slope at most 1.1, and exp good to a few units.
          const Real tol = rel * scale * (silu ? 1.125L : 1) + (silu ? 16 * T::kUnit * std::fabs(want) : 0) +
                           T::kStoreUlp * std::fabs(want) + T::kFloor;
          if (std::fabs(want) + tol > T::kLargest) continue;  // may round to inf in storage
          const Real got = value_of(y[size_t(e)]);
          if (!(std::fabs(got - want) <= tol))
            fail("y[%lld] (n=%lld c=%lld i=%lld) = %.17Lg, reference %.17Lg (x %.17Lg, mean %.17Lg, rstd %.17Lg, "
                 "w %.9Lg, b %.9Lg, error %.3Lg > tolerance %.3Lg)",
                 (long long)e, (long long)n, (long long)c, (long long)i, got, want, value_of(x[size_t(e)]), r.mean,
                 r.rstd, wc, bc, std::fabs(got - want), tol);
        }
      }
    }
}

// dx, dweight and dbias against the reference, on groups whose x, dy, rstd and weight are finite and moderate.
// The reference uses the given rstd and the exact mean of x (the kernels recover the mean's low part from x).
template <class S>
void check_backward_values(const Case& k, const Buffer<S>& dy, const Buffer<S>& x,
                           const typename Traits<S>::P* rstd_given, const typename Traits<S>::P* w,
                           const Buffer<S>& dx, const typename Traits<S>::P* dweight,
                           const typename Traits<S>::P* dbias) {
  using T = Traits<S>;
  const int64_t D = k.D(), M = D * k.p.HxW;
  const Real rel = relative_bound<S>(M + k.p.N * k.p.HxW);
  std::vector<char> channel_checked(size_t(k.p.C), 1);
  // Per channel: the reference gradients, and the magnitudes their errors scale with.
  std::vector<Real> dw_ref(size_t(k.p.C), 0), db_ref(size_t(k.p.C), 0), dw_abs(size_t(k.p.C), 0),
      db_abs(size_t(k.p.C), 0), dw_underflow(size_t(k.p.C), 0);
  for (int64_t n = 0; n < k.p.N; ++n)
    for (int64_t g = 0; g < k.p.G; ++g) {
      const int64_t ng = n * k.p.G + g;
      const Real r = Real(rstd_given[ng]);
      bool ok = std::isfinite(r) && r >= 0 && r <= T::kModerate;
      for (int64_t c = g * D; c < (g + 1) * D && ok; ++c) {
        if (w && !(std::fabs(w[c]) <= 64)) ok = false;
        for (int64_t i = 0; i < k.p.HxW; ++i) {
          const Real xv = value_of(x[size_t(k.index(n, c, i))]), g_v = value_of(dy[size_t(k.index(n, c, i))]);
          if (!(std::fabs(xv) <= T::kModerate) || !(std::fabs(g_v) <= T::kModerate)) ok = false;
        }
      }
      if (!ok) {
        for (int64_t c = g * D; c < (g + 1) * D; ++c) channel_checked[size_t(c)] = 0;
        continue;
      }
      GroupRef mu;
      auto value = [&](int64_t j) { return value_of(x[size_t(k.index(n, g * D + j / k.p.HxW, j % k.p.HxW))]); };
      reference_mean(mu, M, value);
      // The kernels know the mean to ~rel * sigma (as the forward does), so x_hat to ~rel * sigma * rstd:
      // the result moves by that much times its derivative in the mean, whatever the cancellation elsewhere.
      Real m2 = 0;
      for (int64_t j = 0; j < M; ++j) m2 += mu.centered(value(j)) * mu.centered(value(j));
      const Real mean_slack = 4 * std::sqrt(m2 / Real(M)) * r;
      Real a = 0, bsum = 0, a_abs = 0, b_abs = 0;  // sums of w*dy and w*dy*xhat, and of their magnitudes
      Real w_max = 0;                               // the largest |w| of the group
      for (int64_t c = g * D; c < (g + 1) * D; ++c) {
        const Real wc = w ? Real(w[c]) : 1;
        w_max = std::max(w_max, std::fabs(wc));
        for (int64_t i = 0; i < k.p.HxW; ++i) {
          const int64_t e = k.index(n, c, i);
          const Real gv = value_of(dy[size_t(e)]), xhat = mu.centered(value_of(x[size_t(e)])) * r;
          a += wc * gv;
          bsum += wc * gv * xhat;
          a_abs += std::fabs(wc * gv);
          b_abs += std::fabs(wc * gv * xhat);
          dw_ref[size_t(c)] += gv * xhat;
          db_ref[size_t(c)] += gv;
          dw_abs[size_t(c)] += std::fabs(gv * xhat) + mean_slack * std::fabs(gv);
          dw_underflow[size_t(c)] += r * T::kProductStep;  // dy * (x - mean) rounded where it underflows, times rstd
          db_abs[size_t(c)] += std::fabs(gv);
        }
      }
      a /= Real(M);
      bsum /= Real(M);
      a_abs /= Real(M);
      b_abs /= Real(M);
      for (int64_t c = g * D; c < (g + 1) * D; ++c) {
        const Real wc = w ? Real(w[c]) : 1;
        for (int64_t i = 0; i < k.p.HxW; ++i) {
          const int64_t e = k.index(n, c, i);
          const Real gv = value_of(dy[size_t(e)]), xhat = mu.centered(value_of(x[size_t(e)])) * r;
          const Real want = r * (wc * gv - a - xhat * bsum);
          const Real scale = r * (std::fabs(wc * gv) + (1 + std::fabs(xhat)) * (1 + mean_slack) * (a_abs + b_abs));
          // The underflow of the M products dy * (x - mean) moves sum(w*dy*xhat)/M by up to rstd * max|w| *
          // kProductStep, and dx by rstd * |xhat| times that.
          const Real underflow = r * r * (1 + std::fabs(xhat)) * w_max * T::kProductStep;
          const Real tol = rel * scale + T::kStoreUlp * std::fabs(want) + T::kFloor + underflow;
          // Cancelling terms past the storage range: the compute type's rounding error alone may round to inf.
          if (std::fabs(want) + tol > T::kLargest) continue;
          const Real got = value_of(dx[size_t(e)]);
          if (!(std::fabs(got - want) <= tol))
            fail("dx[%lld] (n=%lld c=%lld i=%lld) = %.17Lg, reference %.17Lg (dy %.9Lg, x %.17Lg, mean %.17Lg, "
                 "rstd %.17Lg, w %.9Lg, error %.3Lg > tolerance %.3Lg)",
                 (long long)e, (long long)n, (long long)c, (long long)i, got, want, gv, value_of(x[size_t(e)]),
                 mu.mean, r, wc, std::fabs(got - want), tol);
        }
      }
    }
  for (int64_t c = 0; c < k.p.C; ++c) {
    if (!channel_checked[size_t(c)]) continue;
    if (dweight) {
      const Real tol = rel * dw_abs[size_t(c)] + dw_underflow[size_t(c)] + 0x1p-80L;
      if (!(std::fabs(Real(dweight[c]) - dw_ref[size_t(c)]) <= tol))
        fail("dweight[%lld] = %.17g, reference %.17Lg (tolerance %.3Lg)", (long long)c, double(dweight[c]),
             dw_ref[size_t(c)], tol);
    }
    if (dbias) {
      const Real tol = rel * db_abs[size_t(c)] + 0x1p-80L;
      if (!(std::fabs(Real(dbias[c]) - db_ref[size_t(c)]) <= tol))
        fail("dbias[%lld] = %.17g, reference %.17Lg (tolerance %.3Lg)", (long long)c, double(dbias[c]),
             db_ref[size_t(c)], tol);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// A valid descriptor: every call returns kOk, and the checks above hold.

void expect_status(Status got, Status want, const char* call) {
  if (got != want) fail("%s returned status %d, want %d", call, int(got), int(want));
}

template <class S>
void run_valid(const Case& k, ByteStream& in) {
  using P = typename Traits<S>::P;
  const size_t elements = size_t(k.elements()), groups = size_t(k.groups()), C = size_t(k.p.C);
  const Buffer<S> x = decode_buffer<S>(in, elements, k.offset_in);
  const Buffer<S> dy = decode_buffer<S>(in, elements, k.offset_in);
  const Buffer<P> weight = k.weight ? decode_params<P>(in, C, k.special_params) : Buffer<P>();
  const Buffer<P> bias = k.bias ? decode_params<P>(in, C, k.special_params) : Buffer<P>();
  const P* w = k.weight ? pointer(k, weight) : nullptr;
  const P* b = k.bias ? pointer(k, bias) : nullptr;
  const Buffer<S> x_before = x.copy(), dy_before = dy.copy();
  const Buffer<P> weight_before = weight.copy(), bias_before = bias.copy();
  auto inputs_unchanged = [&] {
    expect_unchanged(x, x_before, "x (an input)");
    expect_unchanged(dy, dy_before, "dy (an input)");
    expect_unchanged(weight, weight_before, "weight (an input)");
    expect_unchanged(bias, bias_before, "bias (an input)");
  };
  // Outputs start as a finite pattern: an element a kernel leaves unwritten shows up against the reference,
  // or where NaN is due.
  auto output = [](size_t count, size_t offset, auto type) {
    Buffer<decltype(type)> out(count, offset);
    out.fill_bytes(0xa5);
    return out;
  };

  // Forward: one thread, then two, out of place with the statistics; then the decoded call.
  auto forward_into = [&](const char* call, const Problem& p, const S* x_in, Buffer<S>& y, Buffer<P>* mean,
                          Buffer<P>* rstd) {
    g_context = call;
    expect_status(groupnorm::group_norm_forward(p, Traits<S>::kDType, x_in, w, b, pointer(k, y),
                                                mean ? pointer(k, *mean) : nullptr,
                                                rstd ? pointer(k, *rstd) : nullptr),
                  groupnorm::kOk, "group_norm_forward");
    inputs_unchanged();
  };
  Buffer<S> y1 = output(elements, k.offset_out, S()), y2 = output(elements, (k.offset_out + 1) % 4, S());
  Buffer<P> mean1 = output(groups, 0, P()), rstd1 = output(groups, 0, P());
  Buffer<P> mean2 = output(groups, 1, P()), rstd2 = output(groups, 1, P());
  forward_into("forward, 1 thread", with_threads(k.p, 1), pointer(k, x), y1, &mean1, &rstd1);
  forward_into("forward, 2 threads", with_threads(k.p, 2), pointer(k, x), y2, &mean2, &rstd2);
  g_context = "forward, 1 vs 2 threads";
  expect_same_values(y1, y2, "y");
  expect_same_values(mean1, mean2, "mean");
  expect_same_values(rstd1, rstd2, "rstd");
  g_context = "forward, reference";
  check_forward_values<S>(k, x, w, b, y1, mean1.data(), rstd1.data());

  Buffer<S> y3 = k.forward_in_place ? x.copy(k.offset_out) : output(elements, k.offset_out, S());
  Buffer<P> mean3 = output(groups, 2, P()), rstd3 = output(groups, 3, P());
  forward_into(k.forward_in_place ? "forward in place, decoded threads" : "forward, decoded threads", k.p,
               k.forward_in_place ? y3.data() : pointer(k, x), y3, k.mean_out ? &mean3 : nullptr,
               k.rstd_out ? &rstd3 : nullptr);
  g_context = k.forward_in_place ? "forward in place vs 1 thread" : "forward, decoded threads vs 1 thread";
  expect_same_values(y3, y1, "y");
  if (k.mean_out) expect_same_values(mean3, mean1, "mean");
  if (k.rstd_out) expect_same_values(rstd3, rstd1, "rstd");

  // Backward from the forward's statistics: one thread, two, then the decoded call.
  const P* mean = pointer(k, mean1);
  const P* rstd = pointer(k, rstd1);
  const Buffer<P> mean_before = mean1.copy(), rstd_before = rstd1.copy();
  auto backward_into = [&](const char* call, const Problem& p, const S* dy_in, const S* x_in, Buffer<S>& dx,
                           Buffer<P>* dw, Buffer<P>* db, Status want = groupnorm::kOk) {
    g_context = call;
    expect_status(groupnorm::group_norm_backward(p, Traits<S>::kDType, dy_in, x_in, mean, rstd, w, b, pointer(k, dx),
                                                 dw ? pointer(k, *dw) : nullptr, db ? pointer(k, *db) : nullptr),
                  want, "group_norm_backward");
    inputs_unchanged();
    expect_unchanged(mean1, mean_before, "mean (an input)");
    expect_unchanged(rstd1, rstd_before, "rstd (an input)");
  };
  Buffer<S> dx1 = output(elements, k.offset_out, S()), dx2 = output(elements, (k.offset_out + 3) % 4, S());
  Buffer<P> dw1 = output(C, 0, P()), db1 = output(C, 0, P()), dw2 = output(C, 1, P()), db2 = output(C, 1, P());
  backward_into("backward, 1 thread", with_threads(k.p, 1), pointer(k, dy), pointer(k, x), dx1, &dw1, &db1);
  backward_into("backward, 2 threads", with_threads(k.p, 2), pointer(k, dy), pointer(k, x), dx2, &dw2, &db2);
  g_context = "backward, 1 vs 2 threads";
  expect_same_values(dx1, dx2, "dx");
  expect_same_values(dw1, dw2, "dweight");
  expect_same_values(db1, db2, "dbias");
  // The values are checked for the normalisation's backward (the SiLU's, which tests/cpp/kernel_check and the
  // Python tests check against references, runs above for its memory accesses and determinism).
  const bool silu = k.p.activation == Activation::kSilu;
  Buffer<S> dx_plain = silu ? output(elements, k.offset_out, S()) : Buffer<S>();
  Buffer<P> dw_plain = silu ? output(C, 0, P()) : Buffer<P>(), db_plain = silu ? output(C, 0, P()) : Buffer<P>();
  if (silu) {
    Problem plain = with_threads(k.p, 1);
    plain.activation = Activation::kNone;
    backward_into("backward without the activation, 1 thread", plain, pointer(k, dy), pointer(k, x), dx_plain,
                  &dw_plain, &db_plain);
  }
  g_context = "backward, reference";
  if (k.elements() > 0) {
    check_backward_values<S>(k, dy, x, rstd, w, silu ? dx_plain : dx1, (silu ? dw_plain : dw1).data(),
                             (silu ? db_plain : db1).data());
  } else {
    for (size_t c = 0; c < C; ++c)
      if (dw1[c] != 0 || db1[c] != 0) fail("dweight / dbias [%zu] of an empty problem is not 0", c);
  }

  Buffer<S> dx3 = k.backward_in_place == 1   ? dy.copy(k.offset_out)
                  : k.backward_in_place == 2 ? x.copy(k.offset_out)
                                             : output(elements, k.offset_out, S());
  Buffer<P> dw3 = output(C, 2, P()), db3 = output(C, 3, P());
  // With an activation, dx over x is refused (its pass would overwrite x before the normalisation reads it).
  const bool refused = silu && k.backward_in_place == 2 && k.elements() > 0;
  const Buffer<S> dx3_before = dx3.copy();
  const Buffer<P> dw3_before = dw3.copy(), db3_before = db3.copy();
  backward_into(k.backward_in_place ? "backward in place, decoded threads" : "backward, decoded threads", k.p,
                k.backward_in_place == 1 ? dx3.data() : pointer(k, dy),
                k.backward_in_place == 2 ? dx3.data() : pointer(k, x), dx3, k.dweight ? &dw3 : nullptr,
                k.dbias ? &db3 : nullptr, refused ? groupnorm::kInvalidArgument : groupnorm::kOk);
  if (refused) {
    g_context = "backward with an activation, dx over x: refused";
    expect_unchanged(dx3, dx3_before, "dx (over x, refused)");
    expect_unchanged(dw3, dw3_before, "dweight (refused)");
    expect_unchanged(db3, db3_before, "dbias (refused)");
    return;
  }
  g_context = k.backward_in_place ? "backward in place vs 1 thread" : "backward, decoded threads vs 1 thread";
  expect_same_values(dx3, dx1, "dx");
  if (k.dweight) expect_same_values(dw3, dw1, "dweight");
  if (k.dbias) expect_same_values(db3, db1, "dbias");
}

// ---------------------------------------------------------------------------------------------------------
// An invalid descriptor (or a null pointer where data is due): kInvalidArgument, and no output touched.

enum class Fault {
  kNegativeN, kNegativeC, kBadG, kNegativeHxW, kIndivisible, kBadEps, kBadLayout, kBadActivation, kBadDType,
  kOverflow, kNullPointer, kCount
};

template <class S>
void run_invalid(Case k, ByteStream& in) {
  using P = typename Traits<S>::P;
  const Fault fault = Fault(in.byte() % int(Fault::kCount));
  DType dtype = Traits<S>::kDType;
  if (fault == Fault::kNullPointer || fault == Fault::kBadDType) {  // on a non-empty shape: data is due
    k.p.N = k.p.N > 0 ? k.p.N : 1;
    k.p.HxW = k.p.HxW > 0 ? k.p.HxW : 1;
    if (k.p.C == 0) k.p.C = k.p.G;
  }
  // Buffers of the valid shape: a kernel that ran anyway would read or write past them.
  const size_t elements = size_t(k.elements()), groups = size_t(k.groups()), C = size_t(k.p.C);
  const Buffer<S> x = decode_buffer<S>(in, elements, k.offset_in), dy = decode_buffer<S>(in, elements, 0);
  const Buffer<P> w = decode_params<P>(in, C, false), b = decode_params<P>(in, C, false);
  Buffer<S> y(elements, k.offset_out), dx(elements, 0);
  Buffer<P> mean(groups, 0), rstd(groups, 0), dw(C, 0), db(C, 0);
  for (Buffer<P>* out : {&mean, &rstd, &dw, &db}) out->fill_bytes(0x5a);
  y.fill_bytes(0x5a);
  dx.fill_bytes(0x5a);
  const Buffer<S> y_before = y.copy(), dx_before = dx.copy();
  const Buffer<P> mean_before = mean.copy(), rstd_before = rstd.copy(), dw_before = dw.copy(), db_before = db.copy();
  const void* fx = x.data();
  void* fy = y.data();
  const void *bdy = dy.data(), *bx = x.data(), *bmean = mean.data(), *brstd = rstd.data();
  void* bdx = dx.data();

  Problem& p = k.p;
  switch (fault) {
    case Fault::kNegativeN:
      p.N = in.pick<int64_t>({-1, -2, INT64_MIN, -(int64_t(1) << 40)});
      break;
    case Fault::kNegativeC:
      p.C = in.pick<int64_t>({-1, -p.G, INT64_MIN, -(int64_t(1) << 40)});
      break;
    case Fault::kBadG:
      p.G = in.pick<int64_t>({0, -1, -p.C, INT64_MIN});
      break;
    case Fault::kNegativeHxW:
      p.HxW = in.pick<int64_t>({-1, -7, INT64_MIN, -(int64_t(1) << 40)});
      break;
    case Fault::kIndivisible:
      p.G = 2 + in.byte() % 7;
      p.C = p.G * (in.byte() % 5) + 1 + in.byte() % (p.G - 1);
      break;
    case Fault::kBadEps:
      p.eps = in.pick<double>({std::numeric_limits<double>::quiet_NaN(), -std::numeric_limits<double>::quiet_NaN(),
                               -1e-5, -std::numeric_limits<double>::infinity(), -4.9406564584124654e-324, -1e300});
      break;
    case Fault::kBadLayout:
      p.layout = Layout(in.pick<int>({2, -1, 255, INT_MAX, INT_MIN}));
      break;
    case Fault::kBadActivation:
      p.activation = Activation(in.pick<int>({2, -1, 255, INT_MAX, INT_MIN}));
      break;
    case Fault::kBadDType:
      dtype = DType(in.pick<int>({4, -1, 255, INT_MAX, INT_MIN}));
      break;
    case Fault::kOverflow: {
      // N x max(C, G) x HxW past 2^57 elements, most of them past int64_t.
      constexpr int64_t kBig = int64_t(1) << 40;
      switch (in.byte() % 7) {
        case 0: p.N = kBig; p.C = int64_t(1) << 20; p.G = 1; p.HxW = int64_t(1) << 20; break;
        case 1: p.N = int64_t(1) << 21; p.C = int64_t(1) << 20; p.G = 4; p.HxW = int64_t(1) << 17; break;
        case 2: p.N = 8; p.C = 0; p.G = int64_t(1) << 60; p.HxW = 0; break;
        case 3: p.N = INT64_MAX; p.C = 1; p.G = 1; p.HxW = 2; break;
        case 4: p.N = 1; p.C = 3; p.G = 3; p.HxW = INT64_MAX; break;
        case 5: p.N = 0; p.C = int64_t(1) << 58; p.G = 1; p.HxW = 0; break;
        default: p.N = 3; p.C = int64_t(1) << 62; p.G = int64_t(1) << 31; p.HxW = 3; break;
      }
      break;
    }
    case Fault::kNullPointer: {
      const uint8_t which = in.byte();
      if (which & 1)
        fx = nullptr;
      else
        fy = nullptr;
      switch ((which >> 1) % 5) {
        case 0: bdy = nullptr; break;
        case 1: bx = nullptr; break;
        case 2: bmean = nullptr; break;
        case 3: brstd = nullptr; break;
        default: bdx = nullptr; break;
      }
      break;
    }
    case Fault::kCount:
      break;
  }
  g_context = "invalid descriptor";
  const Status f = groupnorm::group_norm_forward(p, dtype, fx, w.data(), b.data(), fy, mean.data(), rstd.data());
  if (f != groupnorm::kInvalidArgument)
    fail("group_norm_forward returned %d for fault %d (N=%lld C=%lld G=%lld HxW=%lld eps=%g layout=%d act=%d "
         "dtype=%d), want kInvalidArgument",
         int(f), int(fault), (long long)p.N, (long long)p.C, (long long)p.G, (long long)p.HxW, p.eps,
         int(p.layout), int(p.activation), int(dtype));
  const Status bw = groupnorm::group_norm_backward(p, dtype, bdy, bx, bmean, brstd, w.data(), b.data(), bdx,
                                                   dw.data(), db.data());
  if (bw != groupnorm::kInvalidArgument)
    fail("group_norm_backward returned %d for fault %d (N=%lld C=%lld G=%lld HxW=%lld eps=%g layout=%d act=%d "
         "dtype=%d), want kInvalidArgument",
         int(bw), int(fault), (long long)p.N, (long long)p.C, (long long)p.G, (long long)p.HxW, p.eps,
         int(p.layout), int(p.activation), int(dtype));
  expect_unchanged(y, y_before, "y (rejected call)");
  expect_unchanged(dx, dx_before, "dx (rejected call)");
  expect_unchanged(mean, mean_before, "mean (rejected call)");
  expect_unchanged(rstd, rstd_before, "rstd (rejected call)");
  expect_unchanged(dw, dw_before, "dweight (rejected call)");
  expect_unchanged(db, db_before, "dbias (rejected call)");
}

// ---------------------------------------------------------------------------------------------------------

std::vector<Isa> g_isas;  // compiled and supported

template <class S>
void run_case(const Case& k, bool invalid, ByteStream& in) {
  if (invalid)
    run_invalid<S>(k, in);
  else
    run_valid<S>(k, in);
}

}  // namespace

// libomp's thread pool is still allocated when LeakSanitizer looks at exit: not a leak of groupnorm's.
extern "C" const char* __lsan_default_suppressions() { return "leak:libomp.so\nleak:libgomp.so\n"; }

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // Idle OpenMP workers sleep rather than spin: on a small machine a spinning worker takes the core the next
  // input's checks run on (a third of the speed on two cores).
  setenv("OMP_WAIT_POLICY", "passive", 0);
  for (int i = 0; i < groupnorm::kIsaCount; ++i)
    if (groupnorm::isa_compiled(Isa(i)) && groupnorm::isa_supported(Isa(i))) g_isas.push_back(Isa(i));
  std::fprintf(stderr, "fuzz_entry_points: ISA levels");
  for (Isa isa : g_isas) std::fprintf(stderr, " %s", groupnorm::isa_name(isa));
  std::fprintf(stderr, "; OpenMP %s\n", groupnorm::openmp_enabled() ? "on" : "OFF (one thread)");
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  ByteStream in(data, size);
  g_context = "setup";
  const uint8_t mode = in.byte(), flags = in.byte(), more = in.byte();
  const bool invalid = mode % 8 == 0, big = mode % 8 == 1;

  // ISA: a decoded level that is compiled and supported, and a decoded level that may not be.
  const Isa isa = g_isas[in.byte() % g_isas.size()];
  if (groupnorm::isa_select(isa) != groupnorm::kOk || groupnorm::isa_current() != isa)
    fail("isa_select(%s) failed", groupnorm::isa_name(isa));
  const Isa other = Isa(int(int8_t(in.byte())) % 8);
  const bool other_ok = groupnorm::isa_compiled(other) && groupnorm::isa_supported(other);
  if (!other_ok && (groupnorm::isa_select(other) != groupnorm::kUnsupported || groupnorm::isa_current() != isa))
    fail("isa_select(%d) of an unavailable level: not kUnsupported, or the level changed", int(other));

  Case k;
  const int dtype = flags & 3;
  k.p.layout = (flags >> 2) & 1 ? Layout::kChannelsLast : Layout::kChannelsFirst;
  k.p.activation = (flags >> 3) & 1 ? Activation::kSilu : Activation::kNone;
  k.weight = (flags >> 4) & 1;
  k.bias = (flags >> 5) & 1;
  k.mean_out = (flags >> 6) & 1;
  k.rstd_out = (flags >> 7) & 1;
  k.dweight = more & 1;
  k.dbias = (more >> 1) & 1;
  k.forward_in_place = (more >> 2) & 1;
  k.backward_in_place = ((more >> 3) & 3) % 3;
  k.null_when_empty = (more >> 5) & 1;
  k.special_params = (more >> 6) & 1;
  k.p.eps = in.pick<double>({1e-5, 0.0, -0.0, 4.9406564584124654e-324, 1e-45, 1e-3, 1.0, 1e30, 1e300,
                             std::numeric_limits<double>::infinity(), 0.1, 1e-12});
  k.p.num_threads = in.pick<int>({0, 1, 2, 3, -1, INT_MIN, INT_MAX, 64});
  groupnorm::set_num_threads(in.pick<int>({0, 1, 2, -3, 7, INT_MAX}));
  k.p.stream_threshold_bytes = in.pick<int64_t>({0, -1, 1, INT64_MAX, INT64_MIN, 4096});
  const uint8_t offsets = in.byte();
  k.offset_in = offsets & 15;
  k.offset_out = offsets >> 4;

  if (big) {  // enough elements for two threads (32768 a thread) and several chunks a group
    k.p.N = 1 + in.byte() % 3;
    k.p.G = 1 + in.byte() % 4;
    k.p.C = k.p.G * (1 + in.byte() % 5);
    k.p.HxW = (65536 + k.p.N * k.p.C - 1) / (k.p.N * k.p.C) + int64_t(in.bits(2) % 1024);
  } else {
    k.p.N = in.byte() % 4;
    k.p.G = 1 + in.byte() % 8;
    k.p.C = k.p.G * in.pick<int64_t>({0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17});
    k.p.HxW = in.byte() % (k.p.C > 32 ? 18 : 70);  // wide rows (a 4-vector channel tile) with fewer of them
    // An empty problem with a huge other extent: nothing may be touched but the C parameter gradients.
    if (!invalid && (k.p.N == 0 || k.p.C == 0) && in.byte() % 4 == 0) k.p.HxW = int64_t(1) << (20 + in.byte() % 20);
  }

  static const char* const kDTypeNames[] = {"float32", "float64", "float16", "bfloat16"};
  std::snprintf(g_case, sizeof(g_case),
                "%s%s %s N=%lld C=%lld G=%lld HxW=%lld %s%s eps=%g threads=%d/%d stream=%lld%s%s%s%s%s%s "
                "in_place=%d/%d",
                invalid ? "invalid " : "", groupnorm::isa_name(isa), kDTypeNames[dtype], (long long)k.p.N,
                (long long)k.p.C, (long long)k.p.G, (long long)k.p.HxW,
                k.p.layout == Layout::kChannelsLast ? "NHWC" : "NCHW",
                k.p.activation == Activation::kSilu ? " silu" : "", k.p.eps, k.p.num_threads,
                groupnorm::get_num_threads(), (long long)k.p.stream_threshold_bytes, k.weight ? " weight" : "",
                k.bias ? " bias" : "", k.mean_out ? " mean" : "", k.rstd_out ? " rstd" : "",
                k.dweight ? " dweight" : "", k.dbias ? " dbias" : "", k.forward_in_place, k.backward_in_place);
  if (std::getenv("GROUPNORM_FUZZ_VERBOSE")) std::fprintf(stderr, "case: %s\n", g_case);
  const size_t unit = dtype == 1 ? 8 : dtype == 0 ? 4 : 2;
  k.offset_in %= 64 / unit;
  k.offset_out %= 64 / unit;
  if (!invalid && (k.p.HxW > (int64_t(1) << 22)) && k.p.N > 0 && k.p.C > 0) fail("harness: oversized case");
  switch (dtype) {
    case 0: run_case<float>(k, invalid, in); break;
    case 1: run_case<double>(k, invalid, in); break;
    case 2: run_case<Half>(k, invalid, in); break;
    default: run_case<BFloat16>(k, invalid, in); break;
  }
  return 0;
}
