// kernel_check.cpp — checks group_norm_forward and group_norm_backward on every ISA level that is compiled and
// supported against a long double reference: odd tails, both layouts, SiLU, affine or not, NaN-poisoned outputs
// inside sentinel guards, in-place calls, large offsets, dark borders, bitwise thread determinism.
// Last line: "N passed, M failed".
#include <chrono>
#include <cstdarg>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "groupnorm/groupnorm.h"

namespace {

using groupnorm::Activation;
using groupnorm::DType;
using groupnorm::Isa;
using groupnorm::Layout;
using groupnorm::Problem;
using groupnorm::Status;

constexpr int64_t kGuard = 64;  // sentinel elements before and after every output buffer
constexpr int kMaxPrintedFailures = 12;  // per section, so every section's first failures show

struct Shape {
  int64_t N, C, G, HxW;
  int64_t size() const { return N * C * HxW; }
};

template <class T>
constexpr double tolerance() {
  return sizeof(T) == 4 ? 2e-6 : 1e-12;
}
template <class T>
constexpr DType dtype_of() {
  return sizeof(T) == 4 ? DType::kFloat32 : DType::kFloat64;
}
template <class T>
const char* dtype_name() {
  return sizeof(T) == 4 ? "f32" : "f64";
}
const char* layout_name(Layout layout) { return layout == Layout::kChannelsFirst ? "NCHW" : "NHWC"; }
const char* activation_name(Activation act) { return act == Activation::kSilu ? "silu" : "none"; }

uint64_t g_master_seed = 0;
bool g_quick = false;  // --quick: a thinner sweep for slow targets (qemu); same kinds of checks

// Counts checks; prints the first failures with everything needed to reproduce them.
struct Tally {
  int64_t passed = 0;
  int64_t failed = 0;
  int printed = 0;
  bool expect(bool ok, const std::string& what) {
    if (ok) {
      ++passed;
    } else {
      if (printed++ < kMaxPrintedFailures)
        std::printf("FAIL [seed=%llu] %s\n", (unsigned long long)g_master_seed, what.c_str());
      ++failed;
    }
    return ok;
  }
};

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  char buf[1024];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, args);
  va_end(args);
  return buf;
}

std::string shape_label(const Shape& s) {
  return format("N=%lld C=%lld G=%lld HxW=%lld", (long long)s.N, (long long)s.C, (long long)s.G, (long long)s.HxW);
}

template <class T>
T sentinel() {
  const uint64_t bits = sizeof(T) == 4 ? 0xC4A5A5A5u : 0xC0DEADBEEFCAFE42ull;  // finite, unlikely as a result
  T value;
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

// An output buffer with kGuard sentinels on each side and a NaN-poisoned body.
template <class T>
struct Guarded {
  std::vector<T> storage;
  int64_t n;
  explicit Guarded(int64_t count) : storage(size_t(count + 2 * kGuard)), n(count) { poison(); }
  T* data() { return storage.data() + kGuard; }
  const T* data() const { return storage.data() + kGuard; }
  void poison() {
    for (int64_t i = 0; i < kGuard; ++i) storage[i] = storage[kGuard + n + i] = sentinel<T>();
    for (int64_t i = 0; i < n; ++i) data()[i] = std::numeric_limits<T>::quiet_NaN();
  }
  bool guards_intact() const {
    const T s = sentinel<T>();
    for (int64_t i = 0; i < kGuard; ++i)
      if (std::memcmp(&storage[i], &s, sizeof(T)) != 0 || std::memcmp(&storage[kGuard + n + i], &s, sizeof(T)) != 0)
        return false;
    return true;
  }
  bool bitwise_equal(const Guarded& other) const {
    return n == other.n && std::memcmp(data(), other.data(), sizeof(T) * size_t(n)) == 0;
  }
};

int64_t element_offset(const Shape& s, Layout layout, int64_t n, int64_t c, int64_t i) {
  return layout == Layout::kChannelsFirst ? (n * s.C + c) * s.HxW + i : (n * s.HxW + i) * s.C + c;
}

// Per-(n, group) mean and 1/sqrt(var + eps) in long double, two-pass.
struct ReferenceStats {
  std::vector<long double> mean, rstd;
};

template <class T>
ReferenceStats reference_stats(const Shape& s, Layout layout, const T* x, double eps) {
  const int64_t D = s.C / s.G;
  ReferenceStats ref;
  ref.mean.resize(size_t(s.N * s.G));
  ref.rstd.resize(size_t(s.N * s.G));
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t g = 0; g < s.G; ++g) {
      long double sum = 0;
      for (int64_t c = g * D; c < (g + 1) * D; ++c)
        for (int64_t i = 0; i < s.HxW; ++i) sum += x[element_offset(s, layout, n, c, i)];
      const long double count = (long double)(D * s.HxW), mean = sum / count;
      long double m2 = 0;
      for (int64_t c = g * D; c < (g + 1) * D; ++c)
        for (int64_t i = 0; i < s.HxW; ++i) {
          const long double d = x[element_offset(s, layout, n, c, i)] - mean;
          m2 += d * d;
        }
      ref.mean[size_t(n * s.G + g)] = mean;
      ref.rstd[size_t(n * s.G + g)] = 1.0L / std::sqrt(m2 / count + (long double)eps);
    }
  return ref;
}

// Reference output and, per element, the scale its rounding error is judged against.
struct ReferenceOutput {
  std::vector<long double> value;
  // |act'(y)| * (|z * w| + |b|), z = (x - mean) * rstd: what y = z * w + b inherently loses to rounding when the
  // bias cancels the normalised term, a case the plain max|y_ref| scale cannot absorb.
  std::vector<long double> condition;
};

template <class T>
ReferenceOutput reference_output(const Shape& s, Layout layout, Activation act, const T* x, const T* weight,
                                 const T* bias, const ReferenceStats& ref) {
  const int64_t D = s.C / s.G;
  ReferenceOutput out;
  out.value.resize(size_t(s.size()));
  out.condition.resize(size_t(s.size()));
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t c = 0; c < s.C; ++c) {
      const size_t ng = size_t(n * s.G + c / D);
      const long double scale = ref.rstd[ng] * (weight ? (long double)weight[c] : 1.0L);
      const long double shift = bias ? (long double)bias[c] : 0.0L;
      for (int64_t i = 0; i < s.HxW; ++i) {
        const int64_t k = element_offset(s, layout, n, c, i);
        const long double zw = ((long double)x[k] - ref.mean[ng]) * scale;
        long double y = zw + shift, slope = 1.0L;
        if (act == Activation::kSilu) {
          const long double sigmoid = 1.0L / (1.0L + std::exp(-y));
          slope = std::fabs(sigmoid * (1.0L + y * (1.0L - sigmoid)));
          y = y * sigmoid;
        }
        out.value[size_t(k)] = y;
        out.condition[size_t(k)] = slope * (std::fabs(zw) + std::fabs(shift));
      }
    }
  return out;
}

template <class T>
Status run_forward(const Problem& p, const T* x, const T* weight, const T* bias, T* y, T* mean, T* rstd) {
  return groupnorm::group_norm_forward(p, dtype_of<T>(), x, weight, bias, y, mean, rstd);
}

// Largest error / bound seen, per dtype and quantity: the headroom the tolerances leave.
enum Quantity { kOutput = 0, kOutputSilu, kMean, kRstd, kGradInput, kGradWeight, kGradBias, kQuantityCount };
const char* const kQuantityNames[kQuantityCount] = {"y", "silu(y)", "mean", "rstd", "dx", "dw", "db"};
double g_margin[2][kQuantityCount] = {};

template <class T>
void record_margin(Quantity q, long double ratio) {
  double& worst = g_margin[sizeof(T) == 4 ? 0 : 1][q];
  if (ratio > worst) worst = double(ratio);
}

// Compares y with the reference: |y - y_ref| <= tol * max(max|y_ref|, condition) element-wise (the tolerance is
// relative to the largest reference value, widened only where the bias cancels); NaN (unwritten poison) fails.
template <class T>
void expect_close_output(Tally& tally, const std::string& label, Activation act, const Guarded<T>& y,
                         const ReferenceOutput& ref) {
  const long double tol = tolerance<T>();
  long double max_ref = 0;
  for (long double v : ref.value) max_ref = std::fmax(max_ref, std::fabs(v));
  long double worst_ratio = 0;
  int64_t worst = -1, nan_count = 0;
  for (int64_t k = 0; k < y.n; ++k) {
    const T v = y.data()[k];
    if (std::isnan(v)) {
      if (nan_count++ == 0) worst = k;
      continue;
    }
    const long double bound = tol * std::fmax(max_ref, ref.condition[size_t(k)]);
    const long double err = std::fabs((long double)v - ref.value[size_t(k)]);
    const long double ratio = bound > 0 ? err / bound : (err > 0 ? INFINITY : 0.0L);
    if (ratio > worst_ratio || worst < 0) {
      worst_ratio = ratio;
      if (nan_count == 0) worst = k;
    }
  }
  const bool ok = nan_count == 0 && worst_ratio <= 1;
  record_margin<T>(act == Activation::kSilu ? kOutputSilu : kOutput, worst_ratio);
  if (ok) {
    tally.expect(true, label);
    return;
  }
  if (nan_count > 0) {
    tally.expect(false, format("%s: y has %lld NaN (unwritten poison or computed), the first at index %lld",
                               label.c_str(), (long long)nan_count, (long long)worst));
    return;
  }
  const long double worst_ref = worst >= 0 ? ref.value[size_t(worst)] : 0.0L;
  const long double worst_y = worst >= 0 ? (long double)y.data()[worst] : 0.0L;
  tally.expect(false, format("%s: y out of tolerance: worst |err|/bound=%.3Lf at index %lld (y=%.9Le ref=%.9Le, "
                             "|err|=%.3Le, max|ref|=%.3Le, condition=%.3Le)",
                             label.c_str(), worst_ratio, (long long)worst, worst_y, worst_ref,
                             std::fabs(worst_y - worst_ref), max_ref,
                             worst >= 0 ? ref.condition[size_t(worst)] : 0.0L));
}

// mean_out within tol of the group's scale |mean| + std; rstd_out within tol relative.
template <class T>
void expect_close_stats(Tally& tally, const std::string& label, const Guarded<T>& mean, const Guarded<T>& rstd,
                        const ReferenceStats& ref) {
  const long double tol = tolerance<T>();
  long double worst_mean = 0, worst_rstd = 0;
  int64_t at_mean = 0, at_rstd = 0;
  for (int64_t i = 0; i < mean.n; ++i) {
    const long double m_ref = ref.mean[size_t(i)], r_ref = ref.rstd[size_t(i)];
    const long double mean_ratio =
        std::fabs((long double)mean.data()[i] - m_ref) / (tol * (std::fabs(m_ref) + 1.0L / r_ref));
    const long double rstd_ratio = std::fabs((long double)rstd.data()[i] - r_ref) / (tol * r_ref);
    if (!(mean_ratio <= worst_mean)) {  // a NaN (unwritten) counts as infinitely wrong
      worst_mean = std::isnan(mean_ratio) ? INFINITY : mean_ratio;
      at_mean = i;
    }
    if (!(rstd_ratio <= worst_rstd)) {
      worst_rstd = std::isnan(rstd_ratio) ? INFINITY : rstd_ratio;
      at_rstd = i;
    }
  }
  record_margin<T>(kMean, worst_mean);
  record_margin<T>(kRstd, worst_rstd);
  tally.expect(worst_mean <= 1, format("%s: mean_out[%lld]=%.9Le ref=%.9Le (|err|/bound=%.3Lf)", label.c_str(),
                                       (long long)at_mean, (long double)mean.data()[at_mean],
                                       ref.mean[size_t(at_mean)], worst_mean));
  tally.expect(worst_rstd <= 1, format("%s: rstd_out[%lld]=%.9Le ref=%.9Le (|err|/bound=%.3Lf)", label.c_str(),
                                       (long long)at_rstd, (long double)rstd.data()[at_rstd],
                                       ref.rstd[size_t(at_rstd)], worst_rstd));
}

// One forward call on the current ISA, checked for status, guards, accuracy, statistics and, optionally, that
// the in-place call (x == y) gives the same bits.
template <class T>
void check_forward(Tally& tally, const std::string& label, const Problem& p, const std::vector<T>& x, const T* weight,
                   const T* bias, bool want_stats, bool check_in_place, const ReferenceStats& ref,
                   const ReferenceOutput& y_ref) {
  const Shape s{p.N, p.C, p.G, p.HxW};
  Guarded<T> y(s.size()), mean(s.N * s.G), rstd(s.N * s.G);
  const Status status = run_forward<T>(p, x.data(), weight, bias, y.data(), want_stats ? mean.data() : nullptr,
                                       want_stats ? rstd.data() : nullptr);
  if (!tally.expect(status == groupnorm::kOk, format("%s: status %d", label.c_str(), int(status)))) return;
  tally.expect(y.guards_intact(), label + ": y guard region overwritten");
  expect_close_output(tally, label, p.activation, y, y_ref);
  if (want_stats) {
    tally.expect(mean.guards_intact() && rstd.guards_intact(), label + ": mean_out/rstd_out guard region overwritten");
    expect_close_stats(tally, label, mean, rstd, ref);
  }
  if (check_in_place) {
    Guarded<T> inout(s.size());
    std::memcpy(inout.data(), x.data(), sizeof(T) * x.size());
    const Status st = run_forward<T>(p, inout.data(), weight, bias, inout.data(), nullptr, nullptr);
    tally.expect(st == groupnorm::kOk && inout.guards_intact() && inout.bitwise_equal(y),
                 label + ": in-place result differs from out-of-place (or guards overwritten)");
  }
}

template <class T>
std::vector<T> normal_data(std::mt19937_64& rng, int64_t count, double offset, double scale) {
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<T> v(static_cast<size_t>(count));
  for (auto& e : v) e = T(offset + scale * normal(rng));
  return v;
}

template <class T>
std::vector<T> uniform_data(std::mt19937_64& rng, int64_t count, double lo, double hi) {
  std::uniform_real_distribution<double> uniform(lo, hi);
  std::vector<T> v(static_cast<size_t>(count));
  for (auto& e : v) e = T(uniform(rng));
  return v;
}

struct Levels {
  std::vector<Isa> tested;
};

bool select_level(Tally& tally, Isa isa) {
  const Status st = groupnorm::isa_select(isa);
  return tally.expect(st == groupnorm::kOk && groupnorm::isa_current() == isa,
                      format("isa_select(%s) -> status %d, isa_current()=%s", groupnorm::isa_name(isa), int(st),
                             groupnorm::isa_name(groupnorm::isa_current())));
}

// Which weight/bias pointers a case passes; mean_out/rstd_out are requested in some combinations only.
struct AffineMode {
  bool weight, bias, stats;
  const char* name;
};
constexpr AffineMode kAffineModes[] = {
    {false, false, true, "plain"}, {true, true, true, "w+b"}, {true, false, false, "w"}, {false, true, false, "b"}};

// Accuracy over every layout, activation and affine mode, on every tested level, for one shape.
// With border_pixels = 1 (2), position 0 (and HxW - 1) of every (n, c), in both layouts' indexing, is set to
// border_value: a zero-padded border. A kernel that shifts its sums by a sample it takes from the ends of a
// group or row loses accuracy when that sample sits far from the mean.
template <class T>
void check_shape(Tally& tally, const Levels& levels, const Shape& s, std::mt19937_64& master, double offset,
                 double spread, bool all_affine_modes, bool check_in_place, int border_pixels = 0,
                 double border_value = 0.0) {
  const uint64_t case_seed = master();
  std::mt19937_64 rng(case_seed);
  std::vector<T> x = normal_data<T>(rng, s.size(), offset, spread);
  for (Layout layout : {Layout::kChannelsFirst, Layout::kChannelsLast})
    for (int64_t n = 0; n < s.N; ++n)
      for (int64_t c = 0; c < s.C; ++c)
        for (int b = 0; b < border_pixels; ++b)
          x[size_t(element_offset(s, layout, n, c, b == 0 ? 0 : s.HxW - 1))] = T(border_value);
  const std::vector<T> weight = uniform_data<T>(rng, s.C, -2.0, 2.0);
  const std::vector<T> bias = normal_data<T>(rng, s.C, 0.0, 1.0);
  for (Layout layout : {Layout::kChannelsFirst, Layout::kChannelsLast}) {
    Problem p;
    p.N = s.N, p.C = s.C, p.G = s.G, p.HxW = s.HxW, p.layout = layout, p.eps = 1e-5;
    const ReferenceStats ref = reference_stats(s, layout, x.data(), p.eps);
    for (Activation act : {Activation::kNone, Activation::kSilu}) {
      p.activation = act;
      for (const AffineMode& mode : kAffineModes) {
        // all modes, or with --quick plain and w+b only; otherwise w+b alone
        const bool wanted = all_affine_modes ? (!g_quick || mode.weight == mode.bias) : (mode.weight && mode.bias);
        if (!wanted) continue;
        const T* w = mode.weight ? weight.data() : nullptr;
        const T* b = mode.bias ? bias.data() : nullptr;
        const ReferenceOutput y_ref = reference_output(s, layout, act, x.data(), w, b, ref);
        for (Isa isa : levels.tested) {
          if (!select_level(tally, isa)) continue;
          const std::string label =
              format("isa=%s %s %s act=%s affine=%s %s data=%g+%g*N(0,1)%s case_seed=%llu", groupnorm::isa_name(isa),
                     dtype_name<T>(), layout_name(layout), activation_name(act), mode.name, shape_label(s).c_str(),
                     offset, spread, border_pixels == 0 ? "" : format(" border_pixels=%d of %g", border_pixels, border_value).c_str(),
                     (unsigned long long)case_seed);
          check_forward(tally, label, p, x, w, b, mode.stats, check_in_place, ref, y_ref);
        }
      }
    }
  }
}

std::vector<int64_t> group_counts(int64_t C) {
  std::vector<int64_t> gs{1};
  for (int64_t g = 2; g < C; ++g)
    if (C % g == 0) {
      gs.push_back(g);  // the smallest proper divisor > 1, so a middle D is covered too
      break;
    }
  if (C > 1) gs.push_back(C);
  return gs;
}

template <class T>
void check_tails(Tally& tally, const Levels& levels, std::mt19937_64& master) {
  const int64_t tails[] = {1, 3, 7, 15, 16, 17, 31, 33, 63, 65};
  for (int64_t N = 1; N <= 3; ++N)
    for (int64_t C : tails)
      for (int64_t HxW : tails) {
        if (g_quick && (C + HxW) % 3 != N - 1) continue;  // each (C, HxW) once, N cycling through 1..3
        for (int64_t G : group_counts(C)) check_shape<T>(tally, levels, {N, C, G, HxW}, master, 0.5, 1.5, true, true);
      }
}

template <class T>
void check_large(Tally& tally, const Levels& levels, std::mt19937_64& master, double offset, double spread) {
  const Shape shapes[] = {
      {1, 1, 1, 16384},        {1, 1, 1, 16383},        {2, 1, 1, 16385},         {2, 3, 1, 3 * 16384 + 5},
      {1, 3, 3, 3 * 16384 + 5}, {3, 4, 2, 16384},        {1, 2, 1, 600001},       // > 64 chunks per group
      {2, 32, 8, 49},          {1, 64, 32, 17},         {2, 320, 32, 7},          {1, 2048, 32, 9},
      {1, 96, 1, 1},           {3, 6, 2, 1},            {1, 256, 16, 65},         {2, 5, 5, 1023},
  };
  for (const Shape& s : shapes)
    if (!g_quick || s.size() <= 200000) check_shape<T>(tally, levels, s, master, offset, spread, false, false);
}

// Data 200 + N(0,1) whose first (and last) pixel per channel is 0, a dark or zero-padded border: statistics
// that shift their sums by a sample near the border cancel catastrophically here unless they guard against it.
template <class T>
void check_border_outliers(Tally& tally, const Levels& levels, std::mt19937_64& master, int border_pixels) {
  const Shape shapes[] = {{1, 1, 1, 4096}, {2, 4, 2, 1024}, {1, 3, 1, 3 * 16384 + 5}, {2, 16, 4, 257}, {1, 32, 32, 64}};
  for (const Shape& s : shapes) check_shape<T>(tally, levels, s, master, 200.0, 1.0, false, false, border_pixels, 0.0);
}

// Same bits for num_threads = 1, 2, 3, 5 (and the set_num_threads default), on shapes large enough to split.
template <class T>
void check_thread_determinism(Tally& tally, const Levels& levels, std::mt19937_64& master) {
  struct ThreadCase {
    Shape shape;
    bool in_quick;
    const char* why;  // the parallel path it is meant to reach (for channels-first when NCHW, etc.)
  };
  const ThreadCase cases[] = {
      {{1, 4, 1, 65536 + 33}, false, "one group: chunks split across threads"},
      {{2, 6, 3, 30007}, true, "6 groups: whole groups for 2 and 3 threads, split for 5"},
      {{16, 32, 8, 1031}, false, "many groups: whole groups"},
      {{1, 7, 7, 50001}, true, "channels-last, one sample: row chunks split across threads"},
      {{3, 33, 3, 4099}, false, "3 samples: whole samples for 3 threads, split for 2 and 5"},
  };
  const int thread_counts[] = {2, 3, 5};
  for (const ThreadCase& tc : cases) {
    if (g_quick && !tc.in_quick) continue;
    const Shape& s = tc.shape;
    const uint64_t case_seed = master();
    std::mt19937_64 rng(case_seed);
    const std::vector<T> x = normal_data<T>(rng, s.size(), -0.7, 2.0);
    const std::vector<T> weight = uniform_data<T>(rng, s.C, -2.0, 2.0);
    const std::vector<T> bias = normal_data<T>(rng, s.C, 0.0, 1.0);
    for (Layout layout : {Layout::kChannelsFirst, Layout::kChannelsLast}) {
      Problem p;
      p.N = s.N, p.C = s.C, p.G = s.G, p.HxW = s.HxW, p.layout = layout;
      const ReferenceStats ref = reference_stats(s, layout, x.data(), p.eps);
      for (Activation act : {Activation::kNone, Activation::kSilu}) {
        p.activation = act;
        const ReferenceOutput y_ref = reference_output(s, layout, act, x.data(), weight.data(), bias.data(), ref);
        for (Isa isa : levels.tested) {
          if (!select_level(tally, isa)) continue;
          const std::string label = format("threads isa=%s %s %s act=%s %s (%s) case_seed=%llu",
                                           groupnorm::isa_name(isa), dtype_name<T>(), layout_name(layout),
                                           activation_name(act), shape_label(s).c_str(), tc.why,
                                           (unsigned long long)case_seed);
          p.num_threads = 1;
          check_forward(tally, label + " num_threads=1", p, x, weight.data(), bias.data(), true, false, ref, y_ref);
          Guarded<T> y1(s.size()), mean1(s.N * s.G), rstd1(s.N * s.G);
          run_forward<T>(p, x.data(), weight.data(), bias.data(), y1.data(), mean1.data(), rstd1.data());
          auto expect_same_bits = [&](const std::string& which) {
            Guarded<T> y(s.size()), mean(s.N * s.G), rstd(s.N * s.G);
            const Status st = run_forward<T>(p, x.data(), weight.data(), bias.data(), y.data(), mean.data(), rstd.data());
            tally.expect(st == groupnorm::kOk && y.guards_intact() && y.bitwise_equal(y1) && mean.bitwise_equal(mean1) &&
                             rstd.bitwise_equal(rstd1),
                         label + " " + which + ": result differs bitwise from num_threads=1 (or status/guards)");
          };
          for (int nt : thread_counts) {
            p.num_threads = nt;
            expect_same_bits(format("num_threads=%d", nt));
          }
          groupnorm::set_num_threads(3);
          p.num_threads = 0;
          expect_same_bits("num_threads=0 after set_num_threads(3)");
          groupnorm::set_num_threads(0);
        }
      }
    }
  }
}

// Empty problems succeed without touching y; malformed descriptors are rejected.
void check_edge_cases(Tally& tally, const Levels& levels) {
  for (Isa isa : levels.tested) {
    if (!select_level(tally, isa)) continue;
    const Shape empties[] = {{0, 4, 2, 5}, {2, 0, 1, 5}, {2, 4, 2, 0}};
    for (const Shape& s : empties) {
      Problem p;
      p.N = s.N, p.C = s.C, p.G = s.G, p.HxW = s.HxW;
      Guarded<float> y(0), mean(s.N * s.G), rstd(s.N * s.G);
      const std::vector<float> x(1, 1.0f);
      const Status st = run_forward<float>(p, x.data(), nullptr, nullptr, y.data(), mean.data(), rstd.data());
      tally.expect(st == groupnorm::kOk && y.guards_intact() && mean.guards_intact() && rstd.guards_intact(),
                   format("empty isa=%s %s: status %d or guards overwritten", groupnorm::isa_name(isa),
                          shape_label(s).c_str(), int(st)));
    }
    Problem bad;
    bad.N = 1, bad.C = 6, bad.G = 4, bad.HxW = 3;
    std::vector<float> x(18, 1.0f), y(18);
    tally.expect(run_forward<float>(bad, x.data(), nullptr, nullptr, y.data(), nullptr, nullptr) ==
                     groupnorm::kInvalidArgument,
                 "C % G != 0 must give kInvalidArgument");
    bad.G = 0;
    tally.expect(run_forward<float>(bad, x.data(), nullptr, nullptr, y.data(), nullptr, nullptr) ==
                     groupnorm::kInvalidArgument,
                 "G == 0 must give kInvalidArgument");
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward

template <class T>
constexpr double grad_tolerance() {
  return sizeof(T) == 4 ? 1e-5 : 1e-10;
}

// Reference gradients and the scale each is judged against: max|g_ref|, widened to the size of the terms that
// cancel where the reference value is itself a residue (dx of a 1- or 2-element group; a sum of few terms).
struct ReferenceGrads {
  std::vector<long double> dx, dw, db;
  long double dx_scale = 0, dw_scale = 0, db_scale = 0;
};

template <class T>
ReferenceGrads reference_grads(const Shape& s, Layout layout, const T* dy, const T* x, const T* weight,
                               const ReferenceStats& ref) {
  const int64_t D = s.C / s.G;
  const long double M = (long double)(D * s.HxW);
  ReferenceGrads g;
  g.dx.resize(size_t(s.size()));
  g.dw.assign(size_t(s.C), 0.0L);
  g.db.assign(size_t(s.C), 0.0L);
  std::vector<long double> dw_sq(size_t(s.C), 0.0L), db_sq(size_t(s.C), 0.0L);
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t gr = 0; gr < s.G; ++gr) {
      const size_t ng = size_t(n * s.G + gr);
      const long double mean = ref.mean[ng], rstd = ref.rstd[ng];
      long double sum_wdy = 0, sum_wdy_xhat = 0;
      for (int64_t c = gr * D; c < (gr + 1) * D; ++c)
        for (int64_t i = 0; i < s.HxW; ++i) {
          const int64_t k = element_offset(s, layout, n, c, i);
          const long double w = weight ? (long double)weight[c] : 1.0L, xhat = ((long double)x[k] - mean) * rstd;
          sum_wdy += w * dy[k];
          sum_wdy_xhat += w * dy[k] * xhat;
        }
      for (int64_t c = gr * D; c < (gr + 1) * D; ++c)
        for (int64_t i = 0; i < s.HxW; ++i) {
          const int64_t k = element_offset(s, layout, n, c, i);
          const long double w = weight ? (long double)weight[c] : 1.0L, xhat = ((long double)x[k] - mean) * rstd;
          g.dx[size_t(k)] = rstd * (w * dy[k] - sum_wdy / M - xhat * sum_wdy_xhat / M);
          g.dx_scale = std::fmax(g.dx_scale, std::fabs(rstd * w * dy[k]));
          g.dw[size_t(c)] += dy[k] * xhat;
          g.db[size_t(c)] += dy[k];
          dw_sq[size_t(c)] += (dy[k] * xhat) * (dy[k] * xhat);
          db_sq[size_t(c)] += (long double)dy[k] * dy[k];
        }
    }
  for (int64_t c = 0; c < s.C; ++c) {
    g.dw_scale = std::fmax(g.dw_scale, std::fmax(std::fabs(g.dw[size_t(c)]), std::sqrt(dw_sq[size_t(c)])));
    g.db_scale = std::fmax(g.db_scale, std::fmax(std::fabs(g.db[size_t(c)]), std::sqrt(db_sq[size_t(c)])));
  }
  for (long double v : g.dx) g.dx_scale = std::fmax(g.dx_scale, std::fabs(v));
  return g;
}

template <class T>
Status run_backward(const Problem& p, const T* dy, const T* x, const T* mean, const T* rstd, const T* weight, T* dx,
                    T* dweight, T* dbias) {
  return groupnorm::group_norm_backward(p, dtype_of<T>(), dy, x, mean, rstd, weight, dx, dweight, dbias);
}

// max |g - g_ref| <= tol * scale, no NaN (unwritten poison), guards intact.
template <class T>
void expect_close_grad(Tally& tally, const std::string& label, const char* name, Quantity q, const Guarded<T>& g,
                       const std::vector<long double>& ref, long double scale) {
  const long double bound = grad_tolerance<T>() * (scale > 0 ? scale : 1.0L);
  long double worst_ratio = 0;
  int64_t worst = 0;
  for (int64_t k = 0; k < g.n; ++k) {
    const long double ratio = std::fabs((long double)g.data()[k] - ref[size_t(k)]) / bound;
    if (!(ratio <= worst_ratio)) worst_ratio = std::isnan(ratio) ? INFINITY : ratio, worst = k;
  }
  record_margin<T>(q, worst_ratio);
  tally.expect(g.guards_intact(), label + ": " + name + " guard region overwritten");
  tally.expect(worst_ratio <= 1, format("%s: %s[%lld]=%.9Le ref=%.9Le (|err|/bound=%.3Lf, scale=%.3Le)",
                                        label.c_str(), name, (long long)worst,
                                        g.n ? (long double)g.data()[worst] : 0.0L, g.n ? ref[size_t(worst)] : 0.0L,
                                        worst_ratio, scale));
}

// Forward (for mean and rstd) then backward on the current ISA: accuracy, guards, the same dx without
// dweight/dbias, and in place (dx == dy).
template <class T>
void check_backward_case(Tally& tally, const std::string& label, const Problem& p, const std::vector<T>& dy,
                         const std::vector<T>& x, const T* weight, const ReferenceGrads& ref) {
  const Shape s{p.N, p.C, p.G, p.HxW};
  std::vector<T> y(size_t(s.size())), mean(size_t(s.N * s.G)), rstd(size_t(s.N * s.G));
  Status st = run_forward<T>(p, x.data(), weight, nullptr, y.data(), mean.data(), rstd.data());
  if (!tally.expect(st == groupnorm::kOk, format("%s: forward status %d", label.c_str(), int(st)))) return;
  Guarded<T> dx(s.size()), dw(s.C), db(s.C);
  st = run_backward<T>(p, dy.data(), x.data(), mean.data(), rstd.data(), weight, dx.data(), dw.data(), db.data());
  if (!tally.expect(st == groupnorm::kOk, format("%s: backward status %d", label.c_str(), int(st)))) return;
  expect_close_grad(tally, label, "dx", kGradInput, dx, ref.dx, ref.dx_scale);
  expect_close_grad(tally, label, "dweight", kGradWeight, dw, ref.dw, ref.dw_scale);
  expect_close_grad(tally, label, "dbias", kGradBias, db, ref.db, ref.db_scale);
  Guarded<T> dx_only(s.size());
  st = run_backward<T>(p, dy.data(), x.data(), mean.data(), rstd.data(), weight, dx_only.data(), nullptr, nullptr);
  tally.expect(st == groupnorm::kOk && dx_only.guards_intact() && dx_only.bitwise_equal(dx),
               label + ": dx without dweight/dbias differs");
  Guarded<T> inout(s.size());
  std::memcpy(inout.data(), dy.data(), sizeof(T) * dy.size());
  st = run_backward<T>(p, inout.data(), x.data(), mean.data(), rstd.data(), weight, inout.data(), nullptr, nullptr);
  tally.expect(st == groupnorm::kOk && inout.guards_intact() && inout.bitwise_equal(dx),
               label + ": in-place dx (dx == dy) differs from out-of-place");
}

template <class T>
void check_backward_shape(Tally& tally, const Levels& levels, const Shape& s, std::mt19937_64& master, double offset) {
  const uint64_t case_seed = master();
  std::mt19937_64 rng(case_seed);
  const std::vector<T> x = normal_data<T>(rng, s.size(), offset, 1.5);
  const std::vector<T> dy = normal_data<T>(rng, s.size(), 0.0, 1.0);
  const std::vector<T> weight = uniform_data<T>(rng, s.C, -2.0, 2.0);
  for (Layout layout : {Layout::kChannelsFirst, Layout::kChannelsLast}) {
    Problem p;
    p.N = s.N, p.C = s.C, p.G = s.G, p.HxW = s.HxW, p.layout = layout;
    const ReferenceStats stats = reference_stats(s, layout, x.data(), p.eps);
    for (bool with_weight : {false, true}) {
      const T* w = with_weight ? weight.data() : nullptr;
      const ReferenceGrads ref = reference_grads(s, layout, dy.data(), x.data(), w, stats);
      for (Isa isa : levels.tested) {
        if (!select_level(tally, isa)) continue;
        check_backward_case(tally,
                            format("backward isa=%s %s %s weight=%d %s offset=%g case_seed=%llu",
                                   groupnorm::isa_name(isa), dtype_name<T>(), layout_name(layout), int(with_weight),
                                   shape_label(s).c_str(), offset, (unsigned long long)case_seed),
                            p, dy, x, w, ref);
      }
    }
  }
}

template <class T>
void check_backward_all(Tally& tally, const Levels& levels, std::mt19937_64& master) {
  const int64_t tails[] = {1, 3, 7, 15, 16, 17, 31, 33, 63, 65};
  for (int64_t C : tails)
    for (int64_t HxW : tails)
      for (int64_t G : group_counts(C)) check_backward_shape<T>(tally, levels, {2, C, G, HxW}, master, 0.5);
  const Shape shapes[] = {{1, 1, 1, 16385}, {2, 3, 1, 3 * 16384 + 5}, {1, 2, 1, 600001}, {1, 320, 32, 37},
                          {3, 64, 32, 17},  {1, 7, 7, 50001},         {2, 5, 5, 1023}};
  for (const Shape& s : shapes) check_backward_shape<T>(tally, levels, s, master, 0.5);
  for (const Shape& s : shapes) check_backward_shape<T>(tally, levels, s, master, 1e4);
}

// Same bits of dx, dweight, dbias for num_threads = 1, 2, 3, 5.
template <class T>
void check_backward_determinism(Tally& tally, const Levels& levels, std::mt19937_64& master) {
  const Shape shapes[] = {{1, 4, 1, 65536 + 33}, {2, 6, 3, 30007}, {16, 32, 8, 1031}, {1, 7, 7, 50001}};
  for (const Shape& s : shapes) {
    const uint64_t case_seed = master();
    std::mt19937_64 rng(case_seed);
    const std::vector<T> x = normal_data<T>(rng, s.size(), -0.7, 2.0), dy = normal_data<T>(rng, s.size(), 0.0, 1.0);
    const std::vector<T> weight = uniform_data<T>(rng, s.C, -2.0, 2.0);
    for (Layout layout : {Layout::kChannelsFirst, Layout::kChannelsLast}) {
      Problem p;
      p.N = s.N, p.C = s.C, p.G = s.G, p.HxW = s.HxW, p.layout = layout, p.num_threads = 1;
      std::vector<T> y(size_t(s.size())), mean(size_t(s.N * s.G)), rstd(size_t(s.N * s.G));
      for (Isa isa : levels.tested) {
        if (!select_level(tally, isa)) continue;
        p.num_threads = 1;
        run_forward<T>(p, x.data(), weight.data(), nullptr, y.data(), mean.data(), rstd.data());
        Guarded<T> dx1(s.size()), dw1(s.C), db1(s.C);
        run_backward<T>(p, dy.data(), x.data(), mean.data(), rstd.data(), weight.data(), dx1.data(), dw1.data(),
                        db1.data());
        for (int nt : {2, 3, 5}) {
          p.num_threads = nt;
          Guarded<T> dx(s.size()), dw(s.C), db(s.C);
          const Status st = run_backward<T>(p, dy.data(), x.data(), mean.data(), rstd.data(), weight.data(),
                                            dx.data(), dw.data(), db.data());
          tally.expect(st == groupnorm::kOk && dx.bitwise_equal(dx1) && dw.bitwise_equal(dw1) && db.bitwise_equal(db1),
                       format("backward threads isa=%s %s %s %s num_threads=%d case_seed=%llu: differs from 1 thread",
                              groupnorm::isa_name(isa), dtype_name<T>(), layout_name(layout), shape_label(s).c_str(),
                              nt, (unsigned long long)case_seed));
        }
      }
    }
  }
}

// Empty problems give zero dweight/dbias and leave dx alone.
void check_backward_edge_cases(Tally& tally, const Levels& levels) {
  for (Isa isa : levels.tested) {
    if (!select_level(tally, isa)) continue;
    Problem p;
    p.N = 2, p.C = 4, p.G = 2, p.HxW = 0;
    Guarded<float> dx(0), dw(4), db(4);
    const Status st = run_backward<float>(p, nullptr, nullptr, nullptr, nullptr, nullptr, dx.data(), dw.data(),
                                          db.data());
    bool zeros = true;
    for (int c = 0; c < 4; ++c) zeros = zeros && dw.data()[c] == 0.0f && db.data()[c] == 0.0f;
    tally.expect(st == groupnorm::kOk && zeros && dx.guards_intact() && dw.guards_intact() && db.guards_intact(),
                 format("backward empty isa=%s: status %d, zero grads %d", groupnorm::isa_name(isa), int(st), int(zeros)));
  }
}

Levels detect_levels(Tally& tally) {
  Levels levels;
  for (int i = 0; i < groupnorm::kIsaCount; ++i) {
    const Isa isa = Isa(i);
    const bool compiled = groupnorm::isa_compiled(isa), supported = groupnorm::isa_supported(isa);
    if (compiled && supported) {
      levels.tested.push_back(isa);
      std::printf("level %-7s tested\n", groupnorm::isa_name(isa));
    } else {
      std::printf("level %-7s skipped: %s\n", groupnorm::isa_name(isa),
                  !compiled ? "not compiled into this build" : "not supported by this CPU/OS");
      tally.expect(groupnorm::isa_select(isa) == groupnorm::kUnsupported,
                   format("isa_select(%s) must give kUnsupported", groupnorm::isa_name(isa)));
    }
  }
  return levels;
}

bool has_flag(int argc, char** argv, const char* flag) {
  for (int i = 1; i < argc; ++i)
    if (std::strcmp(argv[i], flag) == 0) return true;
  return false;
}

uint64_t choose_seed(int argc, char** argv) {
  for (int i = 1; i < argc; ++i)
    if (std::strncmp(argv[i], "--seed=", 7) == 0) return std::strtoull(argv[i] + 7, nullptr, 10);
  if (const char* env = std::getenv("GROUPNORM_CHECK_SEED")) return std::strtoull(env, nullptr, 10);
  std::random_device device;
  return (uint64_t(device()) << 32) ^ device();
}

}  // namespace

int main(int argc, char** argv) {
  const auto start = std::chrono::steady_clock::now();
  g_master_seed = choose_seed(argc, argv);
  g_quick = has_flag(argc, argv, "--quick");
  std::printf("kernel_check%s: seed=%llu (rerun with --seed=%llu), openmp=%s, default threads=%d, best level=%s\n",
              g_quick ? " --quick" : "", (unsigned long long)g_master_seed, (unsigned long long)g_master_seed,
              groupnorm::openmp_enabled() ? "on" : "off", groupnorm::get_num_threads(),
              groupnorm::isa_name(groupnorm::isa_best()));
  std::mt19937_64 master(g_master_seed);
  Tally tally;
  const Levels levels = detect_levels(tally);

  auto section = [&](const char* name, auto&& body) {
    const auto t0 = std::chrono::steady_clock::now();
    const int64_t failed_before = tally.failed;
    tally.printed = 0;
    body();
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (tally.failed == failed_before)
      std::printf("%-30s %6.2f s  ok\n", name, secs);
    else
      std::printf("%-30s %6.2f s  %lld FAILED\n", name, secs, (long long)(tally.failed - failed_before));
    std::fflush(stdout);
  };
  section("tails f32", [&] { check_tails<float>(tally, levels, master); });
  section("tails f64", [&] { check_tails<double>(tally, levels, master); });
  section("large shapes f32", [&] { check_large<float>(tally, levels, master, 0.5, 1.5); });
  section("large shapes f64", [&] { check_large<double>(tally, levels, master, 0.5, 1.5); });
  section("large offset f32 (1e4+N(0,1))", [&] { check_large<float>(tally, levels, master, 1e4, 1.0); });
  section("first pixel 0, rest 200 f32", [&] { check_border_outliers<float>(tally, levels, master, 1); });
  section("first pixel 0, rest 200 f64", [&] { check_border_outliers<double>(tally, levels, master, 1); });
  section("both ends 0, rest 200 f32", [&] { check_border_outliers<float>(tally, levels, master, 2); });
  section("both ends 0, rest 200 f64", [&] { check_border_outliers<double>(tally, levels, master, 2); });
  section("thread determinism f32", [&] { check_thread_determinism<float>(tally, levels, master); });
  section("thread determinism f64", [&] { check_thread_determinism<double>(tally, levels, master); });
  section("edge cases", [&] { check_edge_cases(tally, levels); });
  section("backward f32", [&] { check_backward_all<float>(tally, levels, master); });
  section("backward f64", [&] { check_backward_all<double>(tally, levels, master); });
  section("backward determinism f32", [&] { check_backward_determinism<float>(tally, levels, master); });
  section("backward determinism f64", [&] { check_backward_determinism<double>(tally, levels, master); });
  section("backward edge cases", [&] { check_backward_edge_cases(tally, levels); });
  groupnorm::isa_select(groupnorm::isa_best());

  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  for (int f = 0; f < 2; ++f) {
    std::printf("worst |err|/bound %s:", f == 0 ? "f32" : "f64");
    for (int q = 0; q < kQuantityCount; ++q) std::printf(" %s %.3f", kQuantityNames[q], g_margin[f][q]);
    std::printf("\n");
  }
  std::printf("total %.2f s, seed=%llu\n", secs, (unsigned long long)g_master_seed);
  std::printf("%lld passed, %lld failed\n", (long long)tally.passed, (long long)tally.failed);
  return tally.failed == 0 ? 0 : 1;
}
