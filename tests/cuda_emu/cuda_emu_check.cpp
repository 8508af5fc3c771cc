// cuda_emu_check.cpp — checks groupnorm's CUDA kernels (cpp/cuda) without a GPU: the kernel sources compiled for
// the CPU emulator (cuda_emu.h), gn_cuda_forward and gn_cuda_backward against a long double reference on fresh
// random data: float32, float64, float16 and bfloat16 (with their own or float32 parameters), both layouts,
// affine or not, SiLU, optional outputs, in place, misaligned pointers, large offsets. Every output is poisoned
// before the call and sits between guard bytes and inaccessible pages; the workspace is exactly the size asked for;
// inputs must come back unchanged; each call runs twice under different block and thread orders and must give the
// same bits. float16/bfloat16 outputs must be the reference rounded to nearest even but for a slack around rounding
// midpoints. Last line: "N passed, M failed".
//
// Build (tests/test_cuda_emu.py does): c++ -O2 -std=c++17 -fno-strict-aliasing -DGN_CUDA_EMULATE -I cpp/cuda
//   -I cpp/include -I tests/cuda_emu tests/cuda_emu/cuda_emu_check.cpp [-ldl: glibc before 2.34]
// Run: cuda_emu_check [--quick] [--seed=N] [--filter=TEXT] [--print=N] [--verbose] [--no-fork]: --filter runs only
// the calls whose label contains TEXT (e.g. "forward f16 NHWC"), --print prints the first N failures (16),
// --verbose a line per case with its time, --no-fork runs the cases in this process (each runs in a child process
// otherwise, so that a crash fails that case alone).
#include "groupnorm_cuda_impl.cuh"  // the kernels and the C functions of groupnorm_cuda.h, built for the emulator

#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../cpp/check_common.h"  // shared with kernel_check.cpp: helpers, long double references, 16-bit rounding

namespace {

using namespace groupnorm_check;
using groupnorm::BFloat16;
using groupnorm::Half;

// ---- options and tallies ----------------------------------------------------------------------------------

uint64_t g_master_seed = 0;
bool g_quick = false;
const char* g_filter = nullptr;
bool g_verbose = false;  // --verbose: a line per case with its time
bool g_fork = true;      // each case in a child process (--no-fork: in this one, for a debugger)
constexpr unsigned kCaseTimeoutSeconds = 600;
int64_t g_max_printed = 16;  // --print=N: failures printed (the first N)

// The quantities whose worst |error| / bound is kept per section: the headroom the tolerances leave.
enum Quantity { kY, kYSilu, kMean, kRstd, kDx, kDw, kDb, kQuantityCount };
const char* const kQuantityNames[kQuantityCount] = {"y", "silu(y)", "mean", "rstd", "dx", "dw", "db"};

// The counts of one summary line (plain data: a case's child process sends them back through a pipe).
struct Counts {
  int64_t passed = 0, failed = 0, calls = 0;
  double seconds = 0;
  double worst[kQuantityCount] = {};
  int64_t rounded = 0, off_nearest = 0;  // 16-bit outputs checked, and those (within their slack) not the nearest
};

// One summary line: a dtype configuration and a direction (or the problem checks).
struct Section : Counts {
  std::string name;
};

std::deque<Section> g_sections;  // a deque: g_section and callers' references stay valid as sections are added
Section* g_section = nullptr;
int64_t g_printed = 0;
gn_emu::Stats g_emulated;  // launches, blocks... of the cases' child processes

Section& section(const std::string& name) {
  for (Section& s : g_sections)
    if (s.name == name) return s;
  g_sections.emplace_back();
  g_sections.back().name = name;
  return g_sections.back();
}

bool expect(bool ok, const std::string& what) {
  if (ok) {
    ++g_section->passed;
  } else {
    ++g_section->failed;
    if (g_printed++ < g_max_printed)
      std::printf("FAIL [seed=%llu] %s\n", (unsigned long long)g_master_seed, what.c_str());
  }
  return ok;
}

void record(Quantity q, double ratio) {
  if (!(ratio <= g_section->worst[q])) g_section->worst[q] = std::isnan(ratio) ? INFINITY : ratio;
}

// ---- dtypes -----------------------------------------------------------------------------------------------

// The statistics' (and parameter gradients') type, which is also the kernels' compute type.
template <class S>
using stat_t = std::conditional_t<std::is_same<S, double>::value, double, float>;

template <class T>
constexpr int dtype_code() {
  return std::is_same<T, float>::value    ? GN_CUDA_FLOAT32
         : std::is_same<T, double>::value ? GN_CUDA_FLOAT64
         : std::is_same<T, Half>::value   ? GN_CUDA_FLOAT16
                                          : GN_CUDA_BFLOAT16;
}
template <class T>
const char* dtype_name() {
  const char* const names[] = {"f32", "f64", "f16", "bf16"};
  return names[dtype_code<T>()];
}

// ---- device buffers ---------------------------------------------------------------------------------------

// A "device" allocation: `bytes` at `lead` bytes past a 16-byte boundary, with guard bytes before it and up to
// the next 16-byte boundary after it, between two inaccessible pages: a write just outside it changes a guard
// byte, any access further (or a read past its rounded end) faults and the emulator names the thread.
class DeviceBuffer {
 public:
  static constexpr unsigned char kGuardByte = 0xA5;
  static constexpr size_t kGuardBytes = 256;

  DeviceBuffer(size_t bytes, size_t lead) : bytes_(bytes) {
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    const size_t body = (lead + bytes + 15) / 16 * 16;
    const size_t span = (kGuardBytes + body + page - 1) / page * page;
    map_bytes_ = span + 2 * page;
    void* map = mmap(nullptr, map_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map == MAP_FAILED) {
      std::perror("mmap");
      std::exit(2);
    }
    map_ = static_cast<unsigned char*>(map);
    mprotect(map_, page, PROT_NONE);
    mprotect(map_ + page + span, page, PROT_NONE);
    lo_ = map_ + page;
    hi_ = map_ + page + span;
    data_ = hi_ - body + lead;
    std::memset(lo_, kGuardByte, size_t(hi_ - lo_));
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { munmap(map_, map_bytes_); }

  template <class T>
  T* as() {
    return reinterpret_cast<T*>(data_);
  }
  unsigned char* data() { return data_; }
  size_t bytes() const { return bytes_; }
  bool guards_intact() const {
    for (const unsigned char* p = lo_; p < data_; ++p)
      if (*p != kGuardByte) return false;
    for (const unsigned char* p = data_ + bytes_; p < hi_; ++p)
      if (*p != kGuardByte) return false;
    return true;
  }
  template <class T>
  void fill(T value) {
    for (size_t i = 0; i < bytes_ / sizeof(T); ++i) std::memcpy(data_ + i * sizeof(T), &value, sizeof(T));
  }
  template <class T>
  void assign(const std::vector<T>& values) {
    std::memcpy(data_, values.data(), values.size() * sizeof(T));
  }
  bool same_bytes(const void* other) const { return std::memcmp(data_, other, bytes_) == 0; }
  // A pointer no kernel may read: the start of the page past an empty buffer.
  static const void* unreadable() {
    static DeviceBuffer empty(0, 0);
    return empty.data_;
  }

 private:
  unsigned char* map_ = nullptr;
  size_t map_bytes_ = 0;
  unsigned char* lo_ = nullptr;
  unsigned char* hi_ = nullptr;
  unsigned char* data_ = nullptr;
  size_t bytes_;
};

// ---- shapes and data --------------------------------------------------------------------------------------

struct Shape {
  int64_t n, c, g, s;
  int64_t size() const { return n * c * s; }
};

// The references' view of a shape in a layout (channels-last or not).
ShapeLayout shape_layout(const Shape& sh, bool last) { return {sh.n, sh.c, sh.g, sh.s, last}; }

int64_t offset_of(const Shape& sh, bool last, int64_t n, int64_t c, int64_t i) {
  return shape_layout(sh, last).offset(n, c, i);
}

// How x is drawn: offset + spread * N(0,1), and optionally the first element of each (n, c) set to 0 (a dark or
// zero-padded border, far from a mean of 200: statistics shifted by such a sample cancel catastrophically).
struct DataSpec {
  double offset, spread;
  bool zero_first;
  const char* name;
};

// ---- references -------------------------------------------------------------------------------------------

// The statistics' and the forward's references are check_common.h's (reference_stats, reference_output).

// The backward's reference: the gradients of y = silu?((x - mean) rstd w + b) with respect to x, w and b, given dz
// (the gradient at the output), evaluated in long double from x with the statistics the kernel is handed (the
// exact ones rounded to the statistics' dtype: the kernel cannot know better ones, and at an offset of 1e4 a float
// mean is 5e-4 off, which moves dx of a small group by more than float32's tolerance). Beside each gradient, the
// sum of the magnitudes of the terms it is made of, which its rounding error is judged against.
struct BackwardRef {
  std::vector<long double> dx, dx_terms, dw, dw_terms, db, db_terms;
};

template <class S, class P, class A>
BackwardRef reference_backward(const Shape& sh, bool last, bool silu, const std::vector<S>& dz,
                               const std::vector<S>& x, const P* w, const P* b, const std::vector<A>& mean,
                               const std::vector<A>& rstd) {
  const int64_t d = sh.c / sh.g;
  const long double count = (long double)(d * sh.s);
  BackwardRef r;
  r.dx.resize(size_t(sh.size()));
  r.dx_terms.resize(size_t(sh.size()));
  r.dw.assign(size_t(sh.c), 0.0L);
  r.dw_terms.assign(size_t(sh.c), 0.0L);
  r.db.assign(size_t(sh.c), 0.0L);
  r.db_terms.assign(size_t(sh.c), 0.0L);
  std::vector<long double> dyp(size_t(d * sh.s)), dyp_terms(size_t(d * sh.s));
  for (int64_t n = 0; n < sh.n; ++n)
    for (int64_t g = 0; g < sh.g; ++g) {
      const long double mu = mean[size_t(n * sh.g + g)], rs = rstd[size_t(n * sh.g + g)];
      // The gradient at the normalised, affine y (through the SiLU), and its terms' scale: with SiLU, y itself is
      // known to |z w| + |w| / 4 + |b| float ulps (the forward's terms), which moves silu'(y) by silu''(y) times that.
      long double sum_wdy = 0, sum_wdy_xhat = 0, abs_wdy = 0, abs_wdy_xhat = 0;
      for (int64_t c = g * d; c < (g + 1) * d; ++c) {
        const long double wc = w ? value_of(w[c]) : 1.0L, bc = b ? value_of(b[c]) : 0.0L;
        for (int64_t i = 0; i < sh.s; ++i) {
          const size_t k = size_t(offset_of(sh, last, n, c, i)), j = size_t((c - g * d) * sh.s + i);
          const long double xhat = (value_of(x[k]) - mu) * rs, dzk = value_of(dz[k]);
          long double grad = dzk, terms = std::fabs(dzk);
          if (silu) {
            const long double y = xhat * wc + bc, sg = sigmoid(y);
            const long double slope = sg * (1.0L + y * (1.0L - sg));
            const long double curvature = sg * (1.0L - sg) * (2.0L + y * (1.0L - 2.0L * sg));
            grad = dzk * slope;
            const long double y_terms = std::fabs(xhat * wc) + std::fabs(wc) / 4 + std::fabs(bc);
            terms = std::fabs(dzk) * (std::fabs(slope) + std::fabs(curvature) * y_terms);
          }
          dyp[j] = grad;
          dyp_terms[j] = terms;
          sum_wdy += wc * grad;
          sum_wdy_xhat += wc * grad * xhat;
          abs_wdy += std::fabs(wc) * terms;
          abs_wdy_xhat += std::fabs(wc) * terms * std::fabs(xhat);
          r.dw[size_t(c)] += grad * xhat;
          r.dw_terms[size_t(c)] += terms * std::fabs(xhat);
          r.db[size_t(c)] += grad;
          r.db_terms[size_t(c)] += terms;
        }
      }
      for (int64_t c = g * d; c < (g + 1) * d; ++c) {
        const long double wc = w ? value_of(w[c]) : 1.0L;
        for (int64_t i = 0; i < sh.s; ++i) {
          const size_t k = size_t(offset_of(sh, last, n, c, i)), j = size_t((c - g * d) * sh.s + i);
          const long double xhat = (value_of(x[k]) - mu) * rs;
          r.dx[k] = rs * (wc * dyp[j] - sum_wdy / count - xhat * sum_wdy_xhat / count);
          r.dx_terms[k] =
              rs * (std::fabs(wc) * dyp_terms[j] + abs_wdy / count + std::fabs(xhat) * abs_wdy_xhat / count);
        }
      }
    }
  return r;
}

// ---- comparisons ------------------------------------------------------------------------------------------

// float/double outputs: |y - ref| <= tol * max(max|ref|, condition[k]) (relative to the output's scale, widened
// only where the bias cancels the normalised term); NaN (unwritten poison) fails.
template <class S>
void expect_close_output(const std::string& label, Quantity q, const S* y, const ReferenceOutput& ref,
                         long double tol) {
  long double worst = 0;
  int64_t at = -1, nans = 0, first_nan = -1;
  for (size_t k = 0; k < ref.value.size(); ++k) {
    if (std::isnan(y[k])) {
      if (nans++ == 0) first_nan = int64_t(k);
      continue;
    }
    const long double bound = tol * std::fmax(ref.max_abs, ref.condition[k]);
    const long double err = std::fabs((long double)y[k] - ref.value[k]);
    const long double ratio = bound > 0 ? err / bound : (err > 0 ? INFINITY : 0.0L);
    if (ratio > worst || at < 0) worst = ratio, at = int64_t(k);
  }
  record(q, nans ? INFINITY : double(worst));
  if (nans) {
    expect(false, format("%s: y has %lld NaN (unwritten poison or computed), the first at index %lld", label.c_str(),
                         (long long)nans, (long long)first_nan));
    return;
  }
  expect(worst <= 1, format("%s: y[%lld]=%.12Le, reference %.12Le: |err|/bound=%.3Lf (bound %.2Le x max(max|ref| "
                            "%.3Le, condition %.3Le))",
                            label.c_str(), (long long)at, (long double)y[at], ref.value[size_t(at)], worst, tol,
                            ref.max_abs, ref.condition[size_t(at)]));
}

// 16-bit outputs: the reference rounded to nearest even, within a slack around the midpoints (check_rounding).
template <class H>
void expect_rounded(const std::string& label, const char* name, const H* out, const std::vector<long double>& ref,
                    const std::vector<long double>& terms, long double slack_per_term) {
  const RoundingCheck result = check_rounding(out, ref, terms, slack_per_term);
  g_section->rounded += int64_t(ref.size());
  g_section->off_nearest += result.off_nearest;
  if (result.bad == 0)
    expect(true, label);
  else
    expect(false, rounding_failure(label, name, out, ref, terms, slack_per_term, result));
}

// |g - ref| <= tol * terms[k] for every element (terms: the sum of the magnitudes the value is made of); NaN fails.
template <class G>
void expect_close_terms(const std::string& label, const char* name, Quantity q, const G* g,
                        const std::vector<long double>& ref, const std::vector<long double>& terms, long double tol) {
  long double worst = 0;
  size_t at = 0;
  for (size_t k = 0; k < ref.size(); ++k) {
    const long double bound = tol * terms[k];
    const long double err = std::fabs((long double)g[k] - ref[k]);
    const long double ratio = bound > 0 ? err / bound : (err > 0 ? INFINITY : 0.0L);
    if (!(ratio <= worst)) worst = std::isnan(ratio) ? INFINITY : ratio, at = k;
  }
  record(q, double(worst));
  expect(worst <= 1, format("%s: %s[%zu]=%.12Le, reference %.12Le: |err|/bound=%.3Lf (bound %.2Le x terms %.3Le)",
                            label.c_str(), name, at, ref.empty() ? 0.0L : (long double)g[at],
                            ref.empty() ? 0.0L : ref[at], worst, tol, ref.empty() ? 0.0L : terms[at]));
}

// ---- tolerances -------------------------------------------------------------------------------------------

// Forward, float32/float64 y: relative to the output's scale, as kernel_check.cpp (2e-6 is about 16 float32 ulps:
// the statistics of a group reach rstd at a few 1e-7, and y = (x - mean) a + b rounds three or four times).
template <class S>
long double output_tolerance() {
  return std::is_same<S, double>::value ? 1e-12L : 2e-6L;
}
// mean within tol * (|mean| + std), rstd within tol relative.
template <class A>
long double stats_tolerance() {
  return std::is_same<A, double>::value ? 1e-12L : 2e-6L;
}
// 16-bit y: 2^-19 of the terms, about 16 float32 ulps of them (kernel_check.cpp's slack; see its comment), 10 %
// more through the SiLU's exp.
constexpr long double kHalfOutputSlack = 0x1p-19L;
// Gradients, relative to the sum of the magnitudes of their terms: 64 units of the compute type's rounding
// (2^-18 float32, 2^-47 float64). A sum of a few thousand terms, chunked per thread and merged in a tree, loses a
// few ulps of that typically and tens at worst; a dropped, doubled or misplaced term of a sum moves it by that
// term, far more (one term of a group of 4096 is 1/4096 of its terms: 64 times the bound).
template <class A>
long double grad_tolerance() {
  return std::is_same<A, double>::value ? 0x1p-47L : 0x1p-18L;
}
// 16-bit dx: the same 2^-18 of its terms as slack around the rounding midpoints.
constexpr long double kHalfGradSlack = 0x1p-18L;

// ---- cases ------------------------------------------------------------------------------------------------

// kWide: many blocks of 256 threads for little data (seconds each under emulation): in quick mode for float32 only,
// and two variants per layout in full mode too.
// kHuge: full mode, float32 only, channels-last only (what it is there for: more samples than gridDim.y holds), one
// variant per direction (about a minute).
enum CaseFlags : unsigned { kWide = 1, kHuge = 2 };

// Which optional pointers a call passes, how its buffers sit, and whether it also runs in place.
struct Variant {
  bool weight, bias, silu;
  bool outputs_a, outputs_b;  // forward: mean and rstd wanted (both); backward: grad_weight, grad_bias
  int misalign;               // forward: 1 x, 2 y one element off a 16-byte boundary; backward: 1 dy, 2 x, 3 dx
  bool in_place;              // a third run with y == x (dx == dy), which must give the same bits
};

std::string variant_label(const Variant& v, bool forward) {
  const char* const fwd_misalign[] = {"", " x+1", " y+1"};
  const char* const bwd_misalign[] = {"", " dy+1", " x+1", " dx+1"};
  return format("w=%d b=%d silu=%d %s%s%s", int(v.weight), int(v.bias), int(v.silu),
                forward ? (v.outputs_a ? "stats" : "no-stats") : format("gw=%d gb=%d", int(v.outputs_a),
                                                                       int(v.outputs_b)).c_str(),
                forward ? fwd_misalign[v.misalign] : bwd_misalign[v.misalign], v.in_place ? " in-place" : "");
}

// The variants a case runs: all eight (weight, bias, silu) combinations in full mode, two in quick mode, rotating
// with the case index so that a dtype's cases together cover every combination; the optional outputs, the
// misalignment and the in-place run rotate alike.
std::vector<Variant> variants_for(int64_t index, bool forward, unsigned flags) {
  std::vector<Variant> out;
  const int count = (flags & kHuge) ? 1 : (g_quick || (flags & kWide)) ? 2 : 8;
  for (int j = 0; j < count; ++j) {
    const int combo = int((index * count + j + (count < 8 ? index / 4 : 0)) % 8);
    Variant v{};
    v.weight = combo & 1;
    v.bias = combo & 2;
    v.silu = combo & 4;
    const int64_t k = index + j;
    v.outputs_a = forward ? (k % 3 != 2) : (k % 4 == 0 || k % 4 == 1);
    v.outputs_b = forward ? v.outputs_a : (k % 4 == 0 || k % 4 == 2);
    v.misalign = (index % 3 == 1 && j == 0) ? int(1 + (index / 3) % (forward ? 2 : 3)) : 0;
    v.in_place = (index % 4 == 2 && j == count - 1);
    out.push_back(v);
  }
  return out;
}

// A shape, its data, and CaseFlags.
struct CaseSpec {
  Shape shape;
  DataSpec data;
  unsigned flags = 0;
};

std::string shape_label(const Shape& s) {
  return format("N=%lld C=%lld G=%lld S=%lld", (long long)s.n, (long long)s.c, (long long)s.g, (long long)s.s);
}

gn_cuda_problem make_problem(const Shape& sh, bool last, int dtype, int param_dtype, bool silu) {
  gn_cuda_problem p{};
  p.n = sh.n, p.c = sh.c, p.s = sh.s, p.groups = sh.g;
  p.channels_last = last ? 1 : 0;
  p.dtype = dtype;
  p.param_dtype = param_dtype;
  p.silu = silu ? 1 : 0;
  p.eps = 1e-5;
  return p;
}

// The emulator's block/thread-order seeds of a call's two runs (and the in-place third), from the case seed.
uint64_t run_seed(uint64_t case_seed, int run) { return case_seed * 0x9e3779b97f4a7c15ull + uint64_t(run) + 1; }

std::string g_fault_note;  // the call in flight, for the emulator's fault report

void set_note(const std::string& label) {
  g_fault_note = label;
  gn_emu::set_fault_note(g_fault_note.c_str());
}

// One dtype configuration: storage S, parameters P, statistics A.
template <class S, class P>
struct Checker {
  using A = stat_t<S>;
  std::string config;  // e.g. "f16/p32"

  // Forward: two runs (poisoned with NaN, then with a finite sentinel; workspace garbage of two kinds; different
  // block orders) that must agree bitwise, the first checked against the reference; and optionally a third in
  // place.
  void forward(const std::string& case_label, const Shape& sh, bool last, const std::vector<S>& x,
               const std::vector<P>& weight, const std::vector<P>& bias, const ReferenceStats& st, const Variant& v,
               uint64_t case_seed) {
    const std::string label =
        format("forward %s %s %s %s", config.c_str(), last ? "NHWC" : "NCHW", variant_label(v, true).c_str(),
               case_label.c_str());
    if (g_filter && label.find(g_filter) == std::string::npos) return;
    set_note(label);
    const gn_cuda_problem p = make_problem(sh, last, dtype_code<S>(), dtype_code<P>(), v.silu);
    if (!expect(gn_cuda_problem_valid(&p) == 1, label + ": gn_cuda_problem_valid says invalid")) return;
    const size_t ws_bytes = gn_cuda_forward_workspace(&p);
    if (!expect(ws_bytes > 0 && ws_bytes % 16 == 0 && ws_bytes < (size_t(1) << 34),
                format("%s: workspace of %zu bytes", label.c_str(), ws_bytes)))
      return;
    const size_t elems = size_t(sh.size()), groups = size_t(sh.n * sh.g);
    DeviceBuffer xb(elems * sizeof(S), v.misalign == 1 ? sizeof(S) : 0);
    DeviceBuffer wb(size_t(sh.c) * sizeof(P), 0), bb(size_t(sh.c) * sizeof(P), 0);
    xb.assign(x);
    wb.assign(weight);
    bb.assign(bias);
    const P* w = v.weight ? wb.as<P>() : nullptr;
    const P* b = v.bias ? bb.as<P>() : nullptr;
    const ReferenceOutput ref = reference_output(shape_layout(sh, last), v.silu, x.data(),
                                                 v.weight ? weight.data() : nullptr, v.bias ? bias.data() : nullptr,
                                                 st);

    struct Outputs {
      std::vector<unsigned char> y, mean, rstd;
    };
    Outputs first;
    for (int run = 0; run < (v.in_place ? 3 : 2); ++run) {
      const bool in_place = run == 2;
      const std::string run_label = label + format(" run=%d", run);
      DeviceBuffer yb(elems * sizeof(S), (v.misalign == 2 || (in_place && v.misalign == 1)) ? sizeof(S) : 0);
      DeviceBuffer mb(groups * sizeof(A), 0), rb(groups * sizeof(A), 0), ws(ws_bytes, 0);
      if (in_place) yb.assign(x);
      else yb.fill(run == 0 ? quiet_nan<S>() : sentinel<S>());
      mb.fill(run == 0 ? quiet_nan<A>() : sentinel<A>());
      rb.fill(run == 0 ? quiet_nan<A>() : sentinel<A>());
      ws.fill<unsigned char>(run == 0 ? 0xff : 0x7f);  // NaN, or large finite values, in every compute type
      gn_emu::set_seed(run_seed(case_seed, run));
      const int status = gn_cuda_forward(&p, in_place ? yb.as<S>() : xb.as<S>(), w, b, yb.as<S>(),
                                         v.outputs_a ? mb.as<A>() : nullptr, v.outputs_a ? rb.as<A>() : nullptr,
                                         ws.data(), nullptr);
      ++g_section->calls;
      if (!expect(status == 0, format("%s: status %d (%s)", run_label.c_str(), status, gn_emu::last_error())))
        return;
      expect(yb.guards_intact() && mb.guards_intact() && rb.guards_intact(),
             run_label + ": a guard byte beside y, mean or rstd was overwritten");
      expect(ws.guards_intact(), run_label + ": a guard byte past the workspace was overwritten");
      expect(in_place || xb.same_bytes(x.data()), run_label + ": x was modified");
      expect(wb.same_bytes(weight.data()) && bb.same_bytes(bias.data()), run_label + ": weight or bias was modified");
      if (!v.outputs_a) {
        // Not passed: the buffers must hold their poison still (they were never handed over).
        std::vector<A> poison(groups, run == 0 ? quiet_nan<A>() : sentinel<A>());
        expect(mb.same_bytes(poison.data()) && rb.same_bytes(poison.data()), run_label + ": mean/rstd written");
      }
      Outputs out{std::vector<unsigned char>(yb.data(), yb.data() + yb.bytes()),
                  std::vector<unsigned char>(mb.data(), mb.data() + mb.bytes()),
                  std::vector<unsigned char>(rb.data(), rb.data() + rb.bytes())};
      if (run == 0) {
        const S* y = yb.as<S>();
        if constexpr (is_half_v<S>)
          expect_rounded(run_label, "y", y, ref.value, ref.terms, (v.silu ? 1.1L : 1.0L) * kHalfOutputSlack);
        else
          expect_close_output(run_label, v.silu ? kYSilu : kY, y, ref, output_tolerance<S>());
        if (v.outputs_a) check_stats(run_label, mb.as<A>(), rb.as<A>(), st);
        first = std::move(out);
      } else {
        const bool same = out.y == first.y && (!v.outputs_a || (out.mean == first.mean && out.rstd == first.rstd));
        expect(same, format("%s: differs bitwise from run 0 (%s; emulator seeds %llu and %llu)", run_label.c_str(),
                            in_place ? "y == x" : "another block and thread order",
                            (unsigned long long)run_seed(case_seed, 0), (unsigned long long)run_seed(case_seed, run)));
      }
    }
  }

  void check_stats(const std::string& label, const A* mean, const A* rstd, const ReferenceStats& st) {
    const long double tol = stats_tolerance<A>();
    long double worst_mean = 0, worst_rstd = 0;
    size_t at_mean = 0, at_rstd = 0;
    for (size_t i = 0; i < st.mean.size(); ++i) {
      const long double m = st.mean[i], r = st.rstd[i];
      const long double mean_ratio = std::fabs((long double)mean[i] - m) / (tol * (std::fabs(m) + 1.0L / r));
      const long double rstd_ratio = std::fabs((long double)rstd[i] - r) / (tol * r);
      if (!(mean_ratio <= worst_mean)) worst_mean = std::isnan(mean_ratio) ? INFINITY : mean_ratio, at_mean = i;
      if (!(rstd_ratio <= worst_rstd)) worst_rstd = std::isnan(rstd_ratio) ? INFINITY : rstd_ratio, at_rstd = i;
    }
    record(kMean, double(worst_mean));
    record(kRstd, double(worst_rstd));
    expect(worst_mean <= 1, format("%s: mean[%zu]=%.12Le, reference %.12Le (|err|/bound=%.3Lf)", label.c_str(),
                                   at_mean, (long double)mean[at_mean], st.mean[at_mean], worst_mean));
    expect(worst_rstd <= 1, format("%s: rstd[%zu]=%.12Le, reference %.12Le (|err|/bound=%.3Lf)", label.c_str(),
                                   at_rstd, (long double)rstd[at_rstd], st.rstd[at_rstd], worst_rstd));
  }

  // Backward, given the exact statistics rounded to A: two runs that must agree bitwise (and a third in place).
  void backward(const std::string& case_label, const Shape& sh, bool last, const std::vector<S>& x,
                const std::vector<S>& dz, const std::vector<P>& weight, const std::vector<P>& bias,
                const ReferenceStats& st, const Variant& v, uint64_t case_seed) {
    const std::string label =
        format("backward %s %s %s %s", config.c_str(), last ? "NHWC" : "NCHW", variant_label(v, false).c_str(),
               case_label.c_str());
    if (g_filter && label.find(g_filter) == std::string::npos) return;
    set_note(label);
    const gn_cuda_problem p = make_problem(sh, last, dtype_code<S>(), dtype_code<P>(), v.silu);
    if (!expect(gn_cuda_problem_valid(&p) == 1, label + ": gn_cuda_problem_valid says invalid")) return;
    const size_t ws_bytes = gn_cuda_backward_workspace(&p);
    if (!expect(ws_bytes > 0 && ws_bytes % 16 == 0 && ws_bytes < (size_t(1) << 34),
                format("%s: workspace of %zu bytes", label.c_str(), ws_bytes)))
      return;
    const size_t elems = size_t(sh.size()), groups = size_t(sh.n * sh.g);
    std::vector<A> mean(groups), rstd(groups);
    for (size_t i = 0; i < groups; ++i) mean[i] = A(st.mean[i]), rstd[i] = A(st.rstd[i]);
    DeviceBuffer dzb(elems * sizeof(S), v.misalign == 1 ? sizeof(S) : 0);
    DeviceBuffer xb(elems * sizeof(S), v.misalign == 2 ? sizeof(S) : 0);
    DeviceBuffer mb(groups * sizeof(A), 0), rb(groups * sizeof(A), 0);
    DeviceBuffer wb(size_t(sh.c) * sizeof(P), 0), bb(size_t(sh.c) * sizeof(P), 0);
    dzb.assign(dz);
    xb.assign(x);
    mb.assign(mean);
    rb.assign(rstd);
    wb.assign(weight);
    bb.assign(bias);
    const P* w = v.weight ? wb.as<P>() : nullptr;
    // The bias is read only with SiLU: without, a present bias is a pointer that faults when read.
    const P* b = !v.bias ? nullptr : v.silu ? bb.as<P>() : static_cast<const P*>(DeviceBuffer::unreadable());
    const BackwardRef ref = reference_backward<S, P, A>(sh, last, v.silu, dz, x, v.weight ? weight.data() : nullptr,
                                                        v.bias ? bias.data() : nullptr, mean, rstd);

    std::vector<unsigned char> first_dx, first_gw, first_gb;
    for (int run = 0; run < (v.in_place ? 3 : 2); ++run) {
      const bool in_place = run == 2;
      const std::string run_label = label + format(" run=%d", run);
      DeviceBuffer dxb(elems * sizeof(S), (v.misalign == 3 || (in_place && v.misalign == 1)) ? sizeof(S) : 0);
      DeviceBuffer gwb(size_t(sh.c) * sizeof(A), 0), gbb(size_t(sh.c) * sizeof(A), 0), ws(ws_bytes, 0);
      if (in_place) dxb.assign(dz);
      else dxb.fill(run == 0 ? quiet_nan<S>() : sentinel<S>());
      gwb.fill(run == 0 ? quiet_nan<A>() : sentinel<A>());
      gbb.fill(run == 0 ? quiet_nan<A>() : sentinel<A>());
      ws.fill<unsigned char>(run == 0 ? 0xff : 0x7f);
      gn_emu::set_seed(run_seed(case_seed, run));
      const int status = gn_cuda_backward(&p, in_place ? dxb.as<S>() : dzb.as<S>(), xb.as<S>(), mb.as<A>(),
                                          rb.as<A>(), w, b, dxb.as<S>(), v.outputs_a ? gwb.as<A>() : nullptr,
                                          v.outputs_b ? gbb.as<A>() : nullptr, ws.data(), nullptr);
      ++g_section->calls;
      if (!expect(status == 0, format("%s: status %d (%s)", run_label.c_str(), status, gn_emu::last_error())))
        return;
      expect(dxb.guards_intact() && gwb.guards_intact() && gbb.guards_intact(),
             run_label + ": a guard byte beside dx, grad_weight or grad_bias was overwritten");
      expect(ws.guards_intact(), run_label + ": a guard byte past the workspace was overwritten");
      expect((in_place || dzb.same_bytes(dz.data())) && xb.same_bytes(x.data()) && mb.same_bytes(mean.data()) &&
                 rb.same_bytes(rstd.data()) && wb.same_bytes(weight.data()) && bb.same_bytes(bias.data()),
             run_label + ": an input (dy, x, mean, rstd, weight or bias) was modified");
      const std::vector<A> poison(size_t(sh.c), run == 0 ? quiet_nan<A>() : sentinel<A>());
      expect(v.outputs_a || gwb.same_bytes(poison.data()), run_label + ": grad_weight written though not passed");
      expect(v.outputs_b || gbb.same_bytes(poison.data()), run_label + ": grad_bias written though not passed");
      std::vector<unsigned char> dx(dxb.data(), dxb.data() + dxb.bytes());
      std::vector<unsigned char> gw(gwb.data(), gwb.data() + gwb.bytes()), gb(gbb.data(), gbb.data() + gbb.bytes());
      if (run == 0) {
        if constexpr (is_half_v<S>) {
          expect_rounded(run_label, "dx", dxb.as<S>(), ref.dx, ref.dx_terms, kHalfGradSlack);
        } else {
          expect_close_terms(run_label, "dx", kDx, dxb.as<S>(), ref.dx, ref.dx_terms, grad_tolerance<A>());
        }
        if (v.outputs_a)
          expect_close_terms(run_label, "grad_weight", kDw, gwb.as<A>(), ref.dw, ref.dw_terms, grad_tolerance<A>());
        if (v.outputs_b)
          expect_close_terms(run_label, "grad_bias", kDb, gbb.as<A>(), ref.db, ref.db_terms, grad_tolerance<A>());
        first_dx = std::move(dx);
        first_gw = std::move(gw);
        first_gb = std::move(gb);
      } else {
        const bool same = dx == first_dx && (!v.outputs_a || gw == first_gw) && (!v.outputs_b || gb == first_gb);
        expect(same, format("%s: differs bitwise from run 0 (%s; emulator seeds %llu and %llu)", run_label.c_str(),
                            in_place ? "dx == dy" : "another block and thread order",
                            (unsigned long long)run_seed(case_seed, 0), (unsigned long long)run_seed(case_seed, run)));
      }
    }
  }

  // A case: fresh data, both layouts, the variants of its index, forward and backward.
  void run_case(const CaseSpec& cs, int64_t index, uint64_t case_seed) {
    std::mt19937_64 rng(case_seed);
    const Shape& sh = cs.shape;
    std::vector<S> x = normal_data<S>(rng, sh.size(), cs.data.offset, cs.data.spread);
    const std::vector<S> dz = normal_data<S>(rng, sh.size(), 0.0, 1.0);
    const std::vector<P> weight = uniform_data<P>(rng, sh.c, -2.0, 2.0);
    const std::vector<P> bias = normal_data<P>(rng, sh.c, 0.0, 1.0);
    const std::string case_label =
        format("%s data=%s case_seed=%llu", shape_label(sh).c_str(), cs.data.name, (unsigned long long)case_seed);
    const auto case_start = std::chrono::steady_clock::now();
    for (bool last : {false, true}) {
      if (!last && (cs.flags & kHuge)) continue;
      if (cs.data.zero_first)
        for (int64_t n = 0; n < sh.n; ++n)
          for (int64_t c = 0; c < sh.c; ++c) x[size_t(offset_of(sh, last, n, c, 0))] = from_double<S>(0.0);
      const ReferenceStats st = reference_stats(shape_layout(sh, last), x.data(), 1e-5);
      const auto t0 = std::chrono::steady_clock::now();
      g_section = &section(config + " forward");
      for (const Variant& v : variants_for(index * 2 + int(last), true, cs.flags))
        forward(case_label, sh, last, x, weight, bias, st, v, case_seed);
      const auto t1 = std::chrono::steady_clock::now();
      g_section->seconds += std::chrono::duration<double>(t1 - t0).count();
      g_section = &section(config + " backward");
      for (const Variant& v : variants_for(index * 2 + int(last), false, cs.flags))
        backward(case_label, sh, last, x, dz, weight, bias, st, v, case_seed);
      g_section->seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
    }
    if (g_verbose)
      std::printf("  %-9s %7.3f s  %s\n", config.c_str(),
                  std::chrono::duration<double>(std::chrono::steady_clock::now() - case_start).count(),
                  case_label.c_str());
  }
};

// ---- the sweep --------------------------------------------------------------------------------------------

const DataSpec kPlain{0.5, 1.5, false, "0.5+1.5*N(0,1)"};
const DataSpec kOffset{1e4, 1.0, false, "1e4+N(0,1)"};
const DataSpec kHalfOffset{100.0, 5.0, false, "100+5*N(0,1)"};  // 1e4 leaves float16 an ulp of 8
const DataSpec kBorder{200.0, 1.0, true, "200+N(0,1),first=0"};

// The shapes: tails (s = 1 and small odd s, odd C, C not a multiple of 4 or 8: the single-element paths), G = 1 and
// G = C, vector-friendly sizes, large C channels-last, a large s, one group of more than 65536 (split into more
// chunks than columns_merge's threshold), N * C > 65535 at s = 1 (many rows, a thousand (n, g) blocks), offset and
// border data, and in full mode more of each and N > 65535 channels-last (more samples than gridDim.y holds).
std::vector<CaseSpec> case_list(bool float32, bool sixteen_bit) {
  const DataSpec offset = sixteen_bit ? kHalfOffset : kOffset;
  const std::vector<CaseSpec> quick = {
      {{3, 6, 3, 1}, kPlain},      {{2, 5, 5, 1}, kPlain},     {{2, 7, 1, 3}, kPlain},      {{1, 12, 4, 17}, kPlain},
      {{2, 9, 3, 5}, kPlain},      {{3, 10, 10, 11}, kPlain},  {{4, 33, 3, 1}, kPlain},     {{3, 31, 31, 7}, kPlain},
      {{2, 24, 6, 15}, kPlain},    {{2, 16, 4, 16}, kPlain},   {{1, 40, 8, 32}, kPlain},    {{2, 64, 32, 64}, kPlain},
      {{1, 320, 32, 49}, kPlain},  {{1, 2048, 32, 9}, kPlain}, {{2, 1280, 32, 4}, kPlain},  {{1, 4, 1, 4096}, kPlain},
      {{2, 3, 3, 4099}, kPlain},   {{1, 4, 1, 70001}, kPlain}, {{1, 2, 1, 131072}, kPlain}, {{2, 8, 2, 1000}, offset},
      {{1, 3, 1, 20001}, offset},  {{2, 4, 2, 1024}, kBorder}, {{1, 1, 1, 70001}, kBorder},
      {{1025, 64, 1, 1}, kPlain, kWide},
  };
  const std::vector<CaseSpec> full = {
      {{1, 1, 1, 1}, kPlain},       {{1, 1, 1, 7}, kPlain},         {{2, 48, 16, 63}, kPlain},
      {{5, 96, 32, 8}, kPlain},     {{2, 1280, 32, 16}, kPlain},    {{1, 1, 1, 270000}, kPlain},
      {{1, 8, 2, 200003}, kPlain},  {{3, 6, 2, 30007}, kPlain},     {{1, 7, 7, 50001}, kPlain},
      {{2, 320, 32, 37}, offset},   {{1, 64, 32, 4096}, offset},    {{1, 3, 3, 30001}, kBorder},
      {{65537, 2, 1, 1}, kPlain, kHuge},
  };
  std::vector<CaseSpec> cases;
  for (const CaseSpec& c : quick)
    if (!g_quick || !(c.flags & kWide) || float32) cases.push_back(c);
  if (!g_quick)
    for (const CaseSpec& c : full)
      if (!(c.flags & kHuge) || float32) cases.push_back(c);
  return cases;
}

// What a case's child process sends back: the two sections' counts, the failures printed, the emulator's counters.
struct CaseResult {
  Counts forward, backward;
  int64_t printed;
  gn_emu::Stats emulated;
};

bool transfer(int fd, void* data, size_t bytes, bool writing) {
  auto* p = static_cast<unsigned char*>(data);
  while (bytes > 0) {
    const ssize_t n = writing ? write(fd, p, bytes) : read(fd, p, bytes);
    if (n <= 0) return false;
    p += n;
    bytes -= size_t(n);
  }
  return true;
}

// Runs body (a case, which adds to sections forward and backward) in a child process, so that a crash or a hang
// (kCaseTimeoutSeconds) is one failure and the sweep goes on; `what` names the case.
template <class Body>
void run_isolated(Body body, Section& forward, Section& backward, const std::string& what) {
  int fds[2];
  if (pipe(fds) != 0) {
    std::perror("pipe");
    std::exit(2);
  }
  std::fflush(stdout);
  std::fflush(stderr);
  const gn_emu::Stats before = gn_emu::stats();
  const pid_t pid = fork();
  if (pid < 0) {
    std::perror("fork");
    std::exit(2);
  }
  if (pid == 0) {
    close(fds[0]);
    alarm(kCaseTimeoutSeconds);
    body();
    CaseResult result{forward, backward, g_printed, gn_emu::stats()};
    std::fflush(stdout);
    _exit(transfer(fds[1], &result, sizeof result, true) ? 0 : 3);
  }
  close(fds[1]);
  CaseResult result;
  const bool received = transfer(fds[0], &result, sizeof result, false);
  close(fds[0]);
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (received && WIFEXITED(status) && WEXITSTATUS(status) == 0) {
    static_cast<Counts&>(forward) = result.forward;
    static_cast<Counts&>(backward) = result.backward;
    g_printed = result.printed;
    g_emulated.launches += result.emulated.launches - before.launches;
    g_emulated.blocks += result.emulated.blocks - before.blocks;
    g_emulated.threads += result.emulated.threads - before.threads;
    g_emulated.switches += result.emulated.switches - before.switches;
    return;
  }
  g_section = &forward;
  const std::string how = WIFSIGNALED(status) ? format("killed by signal %d (%s)", WTERMSIG(status),
                                                       WTERMSIG(status) == SIGALRM ? "timed out"
                                                                                    : strsignal(WTERMSIG(status)))
                                              : format("exit status %d", WEXITSTATUS(status));
  expect(false, format("case %s crashed: %s; stderr above has the emulator's report of where", what.c_str(),
                       how.c_str()));
}

template <class S, class P>
void check_config(const char* config, std::mt19937_64& master) {
  Checker<S, P> checker{config};
  Section& forward = section(checker.config + " forward");
  Section& backward = section(checker.config + " backward");
  const std::vector<CaseSpec> cases = case_list(std::is_same<S, float>::value, is_half_v<S>);
  for (size_t i = 0; i < cases.size(); ++i) {
    const uint64_t case_seed = master();
    const std::string what = format("%s %s data=%s case_seed=%llu", config, shape_label(cases[i].shape).c_str(),
                                    cases[i].data.name, (unsigned long long)case_seed);
    if (g_fork)
      run_isolated([&] { checker.run_case(cases[i], int64_t(i), case_seed); }, forward, backward, what);
    else
      checker.run_case(cases[i], int64_t(i), case_seed);
  }
}

// ---- invalid problems -------------------------------------------------------------------------------------

// Problems outside the header's rules: gn_cuda_problem_valid 0, both workspaces 0, both calls GN_CUDA_BAD_PROBLEM
// with nothing launched and nothing written. And the one mixed-precision rule that is valid: float32 parameters
// with 16-bit data.
void check_problems() {
  g_section = &section("problem checks");
  if (g_filter && std::string("problem checks").find(g_filter) == std::string::npos) return;
  struct Bad {
    const char* why;
    gn_cuda_problem p;
  };
  const gn_cuda_problem good = make_problem({2, 6, 3, 5}, false, GN_CUDA_FLOAT32, GN_CUDA_FLOAT32, false);
  auto with = [&](auto change) {
    gn_cuda_problem p = good;
    change(p);
    return p;
  };
  const Bad bad[] = {
      {"c % groups != 0", with([](gn_cuda_problem& p) { p.groups = 4; })},
      {"groups = 0", with([](gn_cuda_problem& p) { p.groups = 0; })},
      {"groups < 0", with([](gn_cuda_problem& p) { p.groups = -3; })},
      {"n = 0", with([](gn_cuda_problem& p) { p.n = 0; })},
      {"c = 0", with([](gn_cuda_problem& p) { p.c = 0; })},
      {"s = 0", with([](gn_cuda_problem& p) { p.s = 0; })},
      {"n < 0", with([](gn_cuda_problem& p) { p.n = -2; })},
      {"s < 0", with([](gn_cuda_problem& p) { p.s = -5; })},
      {"eps < 0", with([](gn_cuda_problem& p) { p.eps = -1e-5; })},
      {"eps NaN", with([](gn_cuda_problem& p) { p.eps = std::nan(""); })},
      {"eps inf", with([](gn_cuda_problem& p) { p.eps = INFINITY; })},
      {"dtype 4", with([](gn_cuda_problem& p) { p.dtype = p.param_dtype = 4; })},
      {"dtype -1", with([](gn_cuda_problem& p) { p.dtype = p.param_dtype = -1; })},
      {"param_dtype 7", with([](gn_cuda_problem& p) { p.param_dtype = 7; })},
      {"f32 data, f64 params", with([](gn_cuda_problem& p) { p.param_dtype = GN_CUDA_FLOAT64; })},
      {"f64 data, f32 params",
       with([](gn_cuda_problem& p) { p.dtype = GN_CUDA_FLOAT64, p.param_dtype = GN_CUDA_FLOAT32; })},
      {"f32 data, f16 params", with([](gn_cuda_problem& p) { p.param_dtype = GN_CUDA_FLOAT16; })},
      {"f16 data, bf16 params",
       with([](gn_cuda_problem& p) { p.dtype = GN_CUDA_FLOAT16, p.param_dtype = GN_CUDA_BFLOAT16; })},
      {"bf16 data, f16 params",
       with([](gn_cuda_problem& p) { p.dtype = GN_CUDA_BFLOAT16, p.param_dtype = GN_CUDA_FLOAT16; })},
      {"f16 data, f64 params",
       with([](gn_cuda_problem& p) { p.dtype = GN_CUDA_FLOAT16, p.param_dtype = GN_CUDA_FLOAT64; })},
      {"channels_last 2", with([](gn_cuda_problem& p) { p.channels_last = 2; })},
      {"silu -1", with([](gn_cuda_problem& p) { p.silu = -1; })},
      {"n*c*s = 2^62", with([](gn_cuda_problem& p) {
         p.n = int64_t(1) << 20, p.c = int64_t(1) << 10, p.groups = 1, p.s = int64_t(1) << 32;
       })},
      {"n*c = 2^31", with([](gn_cuda_problem& p) { p.n = int64_t(1) << 30, p.c = 2, p.groups = 1, p.s = 1; })},
      {"n*c*s overflows int64", with([](gn_cuda_problem& p) {
         p.n = int64_t(1) << 40, p.c = int64_t(1) << 20, p.groups = 1, p.s = int64_t(1) << 20;
       })},
  };
  constexpr size_t kElems = 4096;  // more than any bad problem's data that a kernel might touch
  for (const Bad& b : bad) {
    const std::string label = format("bad problem (%s)", b.why);
    set_note(label);
    DeviceBuffer in(kElems * 8, 0), out(kElems * 8, 0), stats(kElems * 8, 0), ws(kElems * 8, 0);
    in.fill<float>(1.0f);
    out.fill<unsigned char>(0x5c);
    stats.fill<unsigned char>(0x5c);
    ws.fill<unsigned char>(0x5c);
    const std::vector<unsigned char> untouched(kElems * 8, 0x5c);
    const uint64_t launches = gn_emu::stats().launches;
    const int valid = gn_cuda_problem_valid(&b.p);
    if (valid != 0) {  // the calls would launch on these small buffers
      expect(false, format("%s: gn_cuda_problem_valid says %d, want 0", label.c_str(), valid));
      continue;
    }
    const size_t fw = gn_cuda_forward_workspace(&b.p), bw = gn_cuda_backward_workspace(&b.p);
    const int fs = gn_cuda_forward(&b.p, in.data(), in.data(), in.data(), out.data(), stats.data(),
                                   stats.data() + kElems * 4, ws.data(), nullptr);
    const int bs = gn_cuda_backward(&b.p, in.data(), in.data(), in.data(), in.data(), in.data(), in.data(),
                                    out.data(), stats.data(), stats.data() + kElems * 4, ws.data(), nullptr);
    const bool nothing = gn_emu::stats().launches == launches && out.same_bytes(untouched.data()) &&
                         stats.same_bytes(untouched.data()) && ws.same_bytes(untouched.data());
    expect(valid == 0 && fw == 0 && bw == 0 && fs == GN_CUDA_BAD_PROBLEM && bs == GN_CUDA_BAD_PROBLEM && nothing,
           format("%s: valid=%d workspaces %zu/%zu, forward %d, backward %d (want 0, 0/0, %d, %d), nothing launched "
                  "or written %d",
                  label.c_str(), valid, fw, bw, fs, bs, GN_CUDA_BAD_PROBLEM, GN_CUDA_BAD_PROBLEM, int(nothing)));
  }
  const std::pair<int, int> mixed[] = {{GN_CUDA_FLOAT16, GN_CUDA_FLOAT32}, {GN_CUDA_BFLOAT16, GN_CUDA_FLOAT32},
                                       {GN_CUDA_FLOAT16, GN_CUDA_FLOAT16}, {GN_CUDA_BFLOAT16, GN_CUDA_BFLOAT16},
                                       {GN_CUDA_FLOAT64, GN_CUDA_FLOAT64}};
  // Sizes at the header's limits, valid by its rules (n*c < 2^31, n*c*s < 2^62); validity and workspaces only.
  const int64_t limits[][3] = {
      {(int64_t(1) << 31) - 1, 1, 1}, {1, 1, (int64_t(1) << 62) - 1}, {1, (int64_t(1) << 31) - 1, 2}};
  for (const auto& l : limits) {
    gn_cuda_problem p = good;
    p.n = l[0], p.c = l[1], p.groups = 1, p.s = l[2];
    for (int last : {0, 1}) {
      p.channels_last = last;
      expect(gn_cuda_problem_valid(&p) == 1 && gn_cuda_forward_workspace(&p) > 0 && gn_cuda_backward_workspace(&p) > 0,
             format("n=%lld c=%lld s=%lld %s (n*c < 2^31, n*c*s < 2^62) must be valid by groupnorm_cuda.h, "
                    "with nonzero workspaces: valid=%d, workspaces %zu/%zu",
                    (long long)p.n, (long long)p.c, (long long)p.s, last ? "NHWC" : "NCHW", gn_cuda_problem_valid(&p),
                    gn_cuda_forward_workspace(&p), gn_cuda_backward_workspace(&p)));
    }
  }
  for (const auto& m : mixed)
    for (double eps : {1e-5, 0.0, 1e308}) {  // eps >= 0 and finite: 0 is valid
      gn_cuda_problem p = good;
      p.dtype = m.first, p.param_dtype = m.second, p.channels_last = 1, p.silu = 1, p.eps = eps;
      expect(gn_cuda_problem_valid(&p) == 1 && gn_cuda_forward_workspace(&p) > 0 && gn_cuda_backward_workspace(&p) > 0,
             format("dtype %d with param_dtype %d, eps %g must be valid with nonzero workspaces", m.first, m.second,
                    eps));
    }
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // lines out before a fault kills the process
  gn_emu::install_fault_handler();          // which case a fault (in a kernel or on the host) interrupted
  const auto start = std::chrono::steady_clock::now();
  g_master_seed = choose_seed(argc, argv);
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) g_quick = true;
    if (std::strncmp(argv[i], "--filter=", 9) == 0) g_filter = argv[i] + 9;
    if (std::strcmp(argv[i], "--verbose") == 0) g_verbose = true;
    if (std::strcmp(argv[i], "--no-fork") == 0) g_fork = false;
    if (std::strncmp(argv[i], "--print=", 8) == 0) g_max_printed = std::strtoll(argv[i] + 8, nullptr, 10);
  }
  std::printf("cuda_emu_check%s: seed=%llu (rerun with --seed=%llu), emulator switch: %s\n", g_quick ? " --quick" : "",
              (unsigned long long)g_master_seed, (unsigned long long)g_master_seed, GN_EMU_SWITCH);
  std::mt19937_64 master(g_master_seed);
  if (g_fork)
    run_isolated(check_problems, section("problem checks"), section("problem checks"), "problem checks");
  else
    check_problems();
  check_config<float, float>("f32", master);
  check_config<double, double>("f64", master);
  check_config<Half, Half>("f16", master);
  check_config<Half, float>("f16/p32", master);
  check_config<BFloat16, BFloat16>("bf16", master);
  check_config<BFloat16, float>("bf16/p32", master);

  int64_t passed = 0, failed = 0;
  for (const Section& s : g_sections) {
    std::printf("%-18s %6.2f s %5lld calls  %s", s.name.c_str(), s.seconds, (long long)s.calls,
                s.failed ? format("%lld FAILED", (long long)s.failed).c_str() : "ok");
    for (int q = 0, shown = 0; q < kQuantityCount; ++q)
      if (s.worst[q] > 0)
        std::printf("%s %s %.3g", shown++ ? "" : "  worst |err|/bound:", kQuantityNames[q], s.worst[q]);
    if (s.rounded) std::printf("; 16-bit not nearest %lld of %lld", (long long)s.off_nearest, (long long)s.rounded);
    std::printf("\n");
    passed += s.passed;
    failed += s.failed;
  }
  gn_emu::Stats es = gn_emu::stats();  // this process's, and its cases' children's
  es.launches += g_emulated.launches, es.blocks += g_emulated.blocks, es.threads += g_emulated.threads;
  es.switches += g_emulated.switches;
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("emulated %llu launches, %llu blocks, %llu threads, %llu fiber switches; total %.2f s, seed=%llu\n",
              (unsigned long long)es.launches, (unsigned long long)es.blocks, (unsigned long long)es.threads,
              (unsigned long long)es.switches, secs, (unsigned long long)g_master_seed);
  std::printf("%lld passed, %lld failed\n", (long long)passed, (long long)failed);
  return failed == 0 ? 0 : 1;
}
