// groupnorm_bench.cpp — times group_norm_forward (and, with --backward, group_norm_backward) from C++ alone, on
// every compiled and supported ISA level and a range of thread counts, in float32, float64, float16 and bfloat16,
// beside a memcpy of the same bytes. Figures are medians over interleaved rounds (kernel batch, then copy batch)
// after a warm-up; GB/s counts the minimal traffic only, in the storage type's bytes: forward reads x and writes
// y, backward reads x and dy and writes dx. 16-bit data is drawn in float and rounded to nearest even. Every
// buffer starts on a cache line, as the Python layer's results of 64 KiB and more do and torch's tensors do.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <new>
#include <random>
#include <sstream>
#include <string>
#include <thread>
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
using Clock = std::chrono::steady_clock;

// 64-byte aligned storage for std::vector: malloc puts a large block 16 bytes past a page boundary, where
// every vector store of a channels-first run would straddle two cache lines.
template <class T>
struct CacheAligned {
  using value_type = T;
  static constexpr std::align_val_t kAlign{64};
  CacheAligned() = default;
  template <class U>
  CacheAligned(const CacheAligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlign)); }
  void deallocate(T* p, size_t) { ::operator delete(p, kAlign); }
  template <class U>
  bool operator==(const CacheAligned<U>&) const { return true; }
  template <class U>
  bool operator!=(const CacheAligned<U>&) const { return false; }
};
template <class T>
using AlignedVector = std::vector<T, CacheAligned<T>>;

struct CaseSpec {
  std::vector<int64_t> shape;  // (N, C, *spatial)
  int64_t G;
  Layout layout;
};

// The case list; [1,320,64,64] is also run channels-last.
std::vector<CaseSpec> default_cases() {
  const Layout first = Layout::kChannelsFirst;
  return {
      {{4, 256, 28, 28}, 32, first},    {{2, 512, 14, 14}, 32, first},   {{1, 64, 32, 32}, 8, first},
      {{1, 320, 64, 64}, 32, first},    {{1, 320, 64, 64}, 32, Layout::kChannelsLast},
      {{1, 128, 256, 256}, 32, first},  {{8, 64, 4096}, 16, first},      {{1, 256, 56, 56}, 1, first},
      {{1, 256, 56, 56}, 256, first},   {{16, 32}, 4, first},
  };
}

std::vector<CaseSpec> quick_cases() {
  return {{{4, 256, 28, 28}, 32, Layout::kChannelsFirst},
          {{1, 320, 64, 64}, 32, Layout::kChannelsLast},
          {{16, 32}, 4, Layout::kChannelsFirst}};
}

struct Options {
  std::vector<CaseSpec> cases;
  bool custom_shape = false;
  std::vector<int64_t> shape;
  int64_t groups = 0;
  Layout layout = Layout::kChannelsFirst;
  std::vector<DType> dtypes = {DType::kFloat32};
  std::vector<int> threads;  // empty: 1, 2, 4, ... up to all
  std::string isa_filter;    // empty: every compiled and supported level
  int reps = 11;
  int warmup = 2;
  double min_batch_ms = 0.5;
  bool quick = false;
  bool backward = false;
  Activation activation = Activation::kNone;
  std::string json_path;
};

struct Row {
  std::string case_name, layout, dtype, pass, isa;
  int threads = 0;
  int64_t elements = 0, bytes = 0;
  double median_us = 0, min_us = 0, copy_us = 0;
  double gbps = 0, copy_gbps = 0, ratio = 0;  // ratio: kernel time / copy time
  int reps = 0;
  int64_t batch = 0, copy_batch = 0;
};

[[noreturn]] void usage_error(const std::string& message) {
  std::fprintf(stderr, "groupnorm_bench: %s (see --help)\n", message.c_str());
  std::exit(2);
}

void print_help() {
  std::printf(
      "usage: groupnorm_bench [--quick] [--shape N,C[,H[,W]] --groups G] [--dtype f32|f64|f16|bf16|both|all,...]\n"
      "                       [--layout nchw|nhwc] [--threads 1,2,...] [--isa NAME] [--reps R]\n"
      "                       [--warmup W] [--min-batch-ms MS] [--backward] [--activation none|silu]\n"
      "                       [--json PATH]\n"
      "Times group_norm_forward (and group_norm_backward with --backward) on every compiled and supported\n"
      "ISA level and thread count, beside a memcpy of the same bytes measured in the same rounds.\n"
      "Default cases: the issue's list; --quick: three of them, 5 reps, threads 1 and all.\n"
      "--dtype takes a comma list; both = f32,f64; all = f32,f64,f16,bf16 (16-bit types: float weight,\n"
      "bias and statistics, the copy floor moves the 16-bit bytes). --activation silu: GroupNorm then SiLU, in\n"
      "the forward and (with the forward's bias) in the backward.\n");
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "f32";
    case DType::kFloat64: return "f64";
    case DType::kFloat16: return "f16";
    case DType::kBFloat16: return "bf16";
  }
  return "?";
}

// A --dtype value: a comma list of f32, f64, f16, bf16 (or their long names), both (f32,f64) and all.
std::vector<DType> parse_dtypes(const std::string& text) {
  std::vector<DType> dtypes;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ',')) {
    std::vector<DType> named;
    if (item == "f32" || item == "float32") named = {DType::kFloat32};
    else if (item == "f64" || item == "float64") named = {DType::kFloat64};
    else if (item == "f16" || item == "float16") named = {DType::kFloat16};
    else if (item == "bf16" || item == "bfloat16") named = {DType::kBFloat16};
    else if (item == "both") named = {DType::kFloat32, DType::kFloat64};
    else if (item == "all") named = {DType::kFloat32, DType::kFloat64, DType::kFloat16, DType::kBFloat16};
    else usage_error("--dtype takes f32, f64, f16, bf16, both or all (comma-separated), not '" + text + "'");
    for (DType d : named) {
      if (std::find(dtypes.begin(), dtypes.end(), d) == dtypes.end()) dtypes.push_back(d);
    }
  }
  if (dtypes.empty()) usage_error("--dtype is empty");
  return dtypes;
}

std::vector<int64_t> parse_int_list(const std::string& text, const char* what) {
  std::vector<int64_t> values;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ',')) {
    char* end = nullptr;
    const long long value = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0' || value <= 0) usage_error(std::string(what) + ": '" + text + "' is not a list of positive integers");
    values.push_back(value);
  }
  if (values.empty()) usage_error(std::string(what) + " is empty");
  return values;
}

Options parse_options(int argc, char** argv) {
  Options opt;
  bool reps_given = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage_error(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "--help" || arg == "-h") {
      print_help();
      std::exit(0);
    } else if (arg == "--quick") {
      opt.quick = true;
    } else if (arg == "--backward") {
      opt.backward = true;
    } else if (arg == "--activation") {
      const std::string v = value();
      if (v == "silu") opt.activation = Activation::kSilu;
      else if (v != "none") usage_error("--activation must be none or silu, not '" + v + "'");
    } else if (arg == "--shape") {
      opt.shape = parse_int_list(value(), "--shape");
      opt.custom_shape = true;
    } else if (arg == "--groups") {
      opt.groups = parse_int_list(value(), "--groups").at(0);
    } else if (arg == "--dtype") {
      opt.dtypes = parse_dtypes(value());
    } else if (arg == "--layout") {
      const std::string v = value();
      if (v == "nchw") opt.layout = Layout::kChannelsFirst;
      else if (v == "nhwc") opt.layout = Layout::kChannelsLast;
      else usage_error("--layout must be nchw or nhwc, not '" + v + "'");
    } else if (arg == "--threads") {
      for (int64_t t : parse_int_list(value(), "--threads")) opt.threads.push_back(int(t));
    } else if (arg == "--isa") {
      opt.isa_filter = value();
    } else if (arg == "--reps") {
      opt.reps = int(parse_int_list(value(), "--reps").at(0));
      reps_given = true;
    } else if (arg == "--warmup") {
      opt.warmup = std::atoi(value().c_str());
    } else if (arg == "--min-batch-ms") {
      opt.min_batch_ms = std::atof(value().c_str());
      if (!(opt.min_batch_ms > 0)) usage_error("--min-batch-ms must be > 0");
    } else if (arg == "--json") {
      opt.json_path = value();
    } else {
      usage_error("unknown argument '" + arg + "'");
    }
  }
  if (opt.custom_shape) {
    if (opt.shape.size() < 2) usage_error("--shape needs at least N,C");
    if (opt.groups <= 0) usage_error("--shape needs --groups G");
    if (opt.shape[1] % opt.groups != 0) usage_error("--groups must divide C");
    opt.cases = {{opt.shape, opt.groups, opt.layout}};
  } else {
    opt.cases = opt.quick ? quick_cases() : default_cases();
  }
  if (opt.quick && !reps_given) opt.reps = 5;
  if (opt.quick) opt.min_batch_ms = std::min(opt.min_batch_ms, 0.2);
  return opt;
}

std::string case_name(const CaseSpec& spec) {
  std::string name;
  for (size_t i = 0; i < spec.shape.size(); ++i) name += (i ? "x" : "") + std::to_string(spec.shape[i]);
  return name + "-g" + std::to_string(spec.G);
}

// Seconds of one batch of k calls of fn.
template <class Fn>
double time_batch(Fn&& fn, int64_t k) {
  const auto start = Clock::now();
  for (int64_t i = 0; i < k; ++i) fn();
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// The smallest k (roughly) for which a batch of k calls lasts at least min_seconds.
template <class Fn>
int64_t calibrate(Fn&& fn, double min_seconds) {
  int64_t k = 1;
  for (;;) {
    const double elapsed = time_batch(fn, k);
    if (elapsed >= min_seconds || k >= (int64_t(1) << 30)) return k;
    const double grow = std::min(100.0, 1.2 * min_seconds / std::max(elapsed, 1e-9));
    k = std::max(k + 1, int64_t(std::ceil(double(k) * grow)));
  }
}

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

// Interleaves `reps` rounds of a kernel batch and a memcpy batch; fills the timing fields of row.
template <class Kernel>
void measure(Kernel&& kernel, void* copy_dst, const void* copy_src, int64_t copy_bytes, const Options& opt,
             Row& row) {
  auto copy = [&] { std::memcpy(copy_dst, copy_src, size_t(copy_bytes)); };
  for (int w = 0; w < opt.warmup; ++w) {
    kernel();
    copy();
  }
  const double min_seconds = opt.min_batch_ms * 1e-3;
  const int64_t k_kernel = calibrate(kernel, min_seconds);
  const int64_t k_copy = calibrate(copy, min_seconds);
  std::vector<double> kernel_us, copy_us;
  for (int r = 0; r < opt.reps; ++r) {
    // Alternate which runs first so neither always meets the other's cache state.
    if (r % 2 == 0) {
      kernel_us.push_back(time_batch(kernel, k_kernel) / double(k_kernel) * 1e6);
      copy_us.push_back(time_batch(copy, k_copy) / double(k_copy) * 1e6);
    } else {
      copy_us.push_back(time_batch(copy, k_copy) / double(k_copy) * 1e6);
      kernel_us.push_back(time_batch(kernel, k_kernel) / double(k_kernel) * 1e6);
    }
  }
  row.median_us = median(kernel_us);
  row.min_us = *std::min_element(kernel_us.begin(), kernel_us.end());
  row.copy_us = median(copy_us);
  row.gbps = double(row.bytes) / (row.median_us * 1e-6) / 1e9;
  row.copy_gbps = double(2 * copy_bytes) / (row.copy_us * 1e-6) / 1e9;
  row.ratio = row.median_us / row.copy_us;
  row.reps = opt.reps;
  row.batch = k_kernel;
  row.copy_batch = k_copy;
}

// The type of weight, bias and statistics for storage type T: float except for double.
template <class T>
struct ComputeOf {
  using type = float;
};
template <>
struct ComputeOf<double> {
  using type = double;
};

// v in storage type T; the 16-bit types go through float, then round to nearest even.
template <class T>
T to_storage(double v) {
  return T(v);
}
template <>
Half to_storage<Half>(double v) {
  return groupnorm::narrow_half(float(v));
}
template <>
BFloat16 to_storage<BFloat16>(double v) {
  return groupnorm::narrow_bfloat16(float(v));
}

template <class T>
AlignedVector<T> random_vector(int64_t n, std::mt19937_64& rng, double scale, double shift) {
  std::normal_distribution<double> normal(0.0, 1.0);
  AlignedVector<T> v(static_cast<size_t>(n));
  for (auto& value : v) value = to_storage<T>(normal(rng) * scale + shift);
  return v;
}

// Every (ISA, threads) row of one case in one dtype (storage type T), forward and, if asked, backward.
template <class T>
void run_case(const CaseSpec& spec, DType dtype, const std::vector<Isa>& isas, const std::vector<int>& threads,
              const Options& opt, std::vector<Row>& rows) {
  Problem p;
  p.N = spec.shape[0];
  p.C = spec.shape[1];
  p.G = spec.G;
  p.HxW = 1;
  for (size_t i = 2; i < spec.shape.size(); ++i) p.HxW *= spec.shape[i];
  // With one position per channel both layouts are the same memory; like the Python layer, run the
  // channels-last kernels there (they vectorise across C).
  p.layout = p.HxW == 1 ? Layout::kChannelsLast : spec.layout;
  p.activation = opt.activation;
  const int64_t n = p.N * p.C * p.HxW;
  const int64_t bytes = n * int64_t(sizeof(T));

  using Compute = typename ComputeOf<T>::type;
  std::mt19937_64 rng(20240611);
  const auto x = random_vector<T>(n, rng, 2.0, 0.5);
  const auto dy = opt.backward ? random_vector<T>(n, rng, 1.0, 0.0) : AlignedVector<T>();
  const auto weight = random_vector<Compute>(p.C, rng, 1.0, 0.0);
  const auto bias = random_vector<Compute>(p.C, rng, 1.0, 0.0);
  const auto un = static_cast<size_t>(n), stats = static_cast<size_t>(p.N * p.G), channels = static_cast<size_t>(p.C);
  AlignedVector<T> y(un), dx(opt.backward ? un : 0);
  std::vector<Compute> mean(stats), rstd(stats), dweight(channels), dbias(channels);
  // The copy floor moves half the kernel's minimal traffic in each direction: the same bytes in total.
  const int64_t max_copy_bytes = opt.backward ? bytes * 3 / 2 : bytes;
  const auto copy_size = static_cast<size_t>(max_copy_bytes);
  AlignedVector<unsigned char> copy_src(copy_size, 1), copy_dst(copy_size);

  const char* layout_name = spec.layout == Layout::kChannelsLast ? "NHWC" : "NCHW";
  for (Isa isa : isas) {
    groupnorm::isa_select(isa);
    for (int t : threads) {
      p.num_threads = t;
      Row row;
      row.case_name = case_name(spec);
      row.layout = layout_name;
      row.dtype = dtype_name(dtype);
      row.isa = groupnorm::isa_name(isa);
      row.threads = t;
      row.elements = n;

      Status status = groupnorm::kOk;
      auto forward = [&] {
        status = groupnorm::group_norm_forward(p, dtype, x.data(), weight.data(), bias.data(), y.data(),
                                               mean.data(), rstd.data());
      };
      row.pass = "forward";
      row.bytes = 2 * bytes;
      measure(forward, copy_dst.data(), copy_src.data(), bytes, opt, row);
      if (status != groupnorm::kOk) usage_error("group_norm_forward failed on " + row.case_name);
      rows.push_back(row);

      if (opt.backward) {
        auto backward = [&] {
          status = groupnorm::group_norm_backward(p, dtype, dy.data(), x.data(), mean.data(), rstd.data(),
                                                  weight.data(), bias.data(), dx.data(), dweight.data(),
                                                  dbias.data());
        };
        row.pass = "backward";
        row.bytes = 3 * bytes;
        measure(backward, copy_dst.data(), copy_src.data(), max_copy_bytes, opt, row);
        if (status != groupnorm::kOk) usage_error("group_norm_backward failed on " + row.case_name);
        rows.push_back(row);
      }
    }
  }
}

std::string cpu_model() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) == 0 || line.rfind("Model", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) return line.substr(line.find_first_not_of(" \t", colon + 1));
    }
  }
  return "unknown";
}

std::string json_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) < 0x20) continue;
    out += c;
  }
  return out;
}

std::string now_iso() {
  const std::time_t t = std::time(nullptr);
  char text[64];
  std::strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%S%z", std::localtime(&t));
  return text;
}

struct Header {
  std::string machine, date, command, isa_best, isas;
  unsigned logical_cpus = 0;
  int max_threads = 0;
  bool openmp = false;
};

void print_table(const Header& h, const std::vector<Row>& rows) {
  std::printf("machine:  %s (%u logical CPUs)\n", h.machine.c_str(), h.logical_cpus);
  std::printf("threads:  up to %d, OpenMP %s;  ISA levels run: %s (best %s)\n", h.max_threads,
              h.openmp ? "on" : "OFF (one thread)", h.isas.c_str(), h.isa_best.c_str());
  std::printf("date:     %s\ncommand:  %s\n", h.date.c_str(), h.command.c_str());
  std::printf("timings:  median us per call over interleaved rounds; GB/s on the minimal bytes (forward: read x,\n"
              "          write y; backward: read x, dy, write dx); copy = single-threaded memcpy of the same bytes\n\n");
  std::printf("%-18s %-6s %-5s %-8s %-11s %7s %11s %9s %11s %9s %8s\n", "case", "layout", "dtype", "pass", "isa",
              "threads", "median us", "GB/s", "copy us", "copy GB/s", "gn/copy");
  std::printf("%s\n", std::string(112, '-').c_str());
  for (const Row& r : rows) {
    std::printf("%-18s %-6s %-5s %-8s %-11s %7d %11.2f %9.2f %11.2f %9.2f %8.2f\n", r.case_name.c_str(),
                r.layout.c_str(), r.dtype.c_str(), r.pass.c_str(), r.isa.c_str(), r.threads, r.median_us, r.gbps,
                r.copy_us, r.copy_gbps, r.ratio);
  }
}

bool write_json(const std::string& path, const Header& h, const Options& opt, const std::vector<Row>& rows) {
  std::ofstream out(path);
  if (!out) return false;
  out << "{\n  \"header\": {\"machine\": \"" << json_escape(h.machine) << "\", \"logical_cpus\": " << h.logical_cpus
      << ", \"max_threads\": " << h.max_threads << ", \"openmp\": " << (h.openmp ? "true" : "false")
      << ", \"isa_best\": \"" << h.isa_best << "\", \"date\": \"" << h.date << "\", \"command\": \""
      << json_escape(h.command) << "\", \"reps\": " << opt.reps << ", \"warmup\": " << opt.warmup
      << ", \"min_batch_ms\": " << opt.min_batch_ms
      << ", \"copy_definition\": \"single-threaded memcpy of the kernel's minimal bytes / 2\"},\n  \"rows\": [";
  for (size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    out << (i ? ",\n" : "\n") << "    {\"case\": \"" << r.case_name << "\", \"layout\": \"" << r.layout
        << "\", \"dtype\": \"" << r.dtype << "\", \"pass\": \"" << r.pass << "\", \"isa\": \"" << r.isa
        << "\", \"threads\": " << r.threads << ", \"elements\": " << r.elements << ", \"bytes\": " << r.bytes
        << ", \"median_us\": " << r.median_us << ", \"min_us\": " << r.min_us << ", \"gbps\": " << r.gbps
        << ", \"copy_us\": " << r.copy_us << ", \"copy_gbps\": " << r.copy_gbps << ", \"over_copy\": " << r.ratio
        << ", \"reps\": " << r.reps << ", \"batch\": " << r.batch << ", \"copy_batch\": " << r.copy_batch << "}";
  }
  out << "\n  ]\n}\n";
  return bool(out);
}

}  // namespace

int main(int argc, char** argv) {
  const Options opt = parse_options(argc, argv);

  std::vector<Isa> isas;
  Header header;
  for (int i = 0; i < groupnorm::kIsaCount; ++i) {
    const Isa isa = Isa(i);
    if (!groupnorm::isa_compiled(isa) || !groupnorm::isa_supported(isa)) continue;
    if (!opt.isa_filter.empty() && opt.isa_filter != groupnorm::isa_name(isa)) continue;
    isas.push_back(isa);
    header.isas += (header.isas.empty() ? "" : ", ") + std::string(groupnorm::isa_name(isa));
  }
  if (isas.empty()) usage_error("--isa '" + opt.isa_filter + "' is not compiled or not supported here");

  header.max_threads = groupnorm::openmp_enabled() ? groupnorm::get_num_threads() : 1;
  std::vector<int> threads;
  for (int t : opt.threads) threads.push_back(t);
  if (threads.empty()) {
    // 1, 2, 4, ... and all of them; --quick: 1 and all.
    for (int t = 1; t < header.max_threads; t *= 2) {
      if (!opt.quick || t == 1) threads.push_back(t);
    }
    threads.push_back(header.max_threads);
  }

  header.machine = cpu_model();
  header.logical_cpus = std::thread::hardware_concurrency();
  header.openmp = groupnorm::openmp_enabled();
  header.isa_best = groupnorm::isa_name(groupnorm::isa_best());
  header.date = now_iso();
  for (int i = 0; i < argc; ++i) header.command += (i ? " " : "") + std::string(argv[i]);

  std::vector<Row> rows;
  for (const CaseSpec& spec : opt.cases) {
    for (DType dtype : opt.dtypes) {
      switch (dtype) {
        case DType::kFloat32: run_case<float>(spec, dtype, isas, threads, opt, rows); break;
        case DType::kFloat64: run_case<double>(spec, dtype, isas, threads, opt, rows); break;
        case DType::kFloat16: run_case<Half>(spec, dtype, isas, threads, opt, rows); break;
        case DType::kBFloat16: run_case<BFloat16>(spec, dtype, isas, threads, opt, rows); break;
      }
    }
  }
  groupnorm::isa_select(groupnorm::isa_best());

  print_table(header, rows);
  if (!opt.json_path.empty() && !write_json(opt.json_path, header, opt, rows)) {
    std::fprintf(stderr, "groupnorm_bench: cannot write %s\n", opt.json_path.c_str());
    return 1;
  }
  return 0;
}
