// groupnorm_node.cpp: groupnorm.torch's autograd node in C++, for the calls where the Python node's own cost
// dominates the step: a CPU tensor under 1 MiB (a training step of [1,64,32,32] spent about 50 us in the
// autograd.Function's Python and the NumPy crossings, against 17 us in the two kernels).
//
// Built into groupnorm/_torch_node.so when CMake finds torch (GROUPNORM_TORCH; a build that can import torch, as
// pip install --no-build-isolation where torch is installed), against that torch's headers and libraries, and
// loaded by groupnorm.torch only under the very torch version it was built for (_torch_node.txt). It registers
// one operator, groupnorm_node::group_norm, whose kernel makes a torch::autograd::Function node around the
// forward and backward of the C++ core that groupnorm._core holds (through the entry points gn_torch_bind_core
// receives from it, so that the ISA level and thread count set through groupnorm apply here too).
//
// The operator serves a call only where it can do so exactly as groupnorm.torch's Python node does: plain strided
// CPU tensors of float32, float64, float16 or bfloat16, contiguous or channels_last, under 1 MiB (larger outputs
// come from _core's buffer pool, which torch's allocator lacks: fresh pages every step), parameters of the compute
// dtype or of the data's (a bfloat16 model's), a num_groups that divides C, eps >= 0, activation None or 'silu'.
// For any other call it returns an empty list and groupnorm.torch takes its Python path, which checks the
// arguments and raises its own errors.
// A second derivative (create_graph=True) takes the Python operator groupnorm::group_norm_backward, whose node
// differentiates the gradients again.
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/Allocator.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <string_view>
#include <thread>
#include <tuple>
#include <vector>

#include "groupnorm/groupnorm.h"

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

namespace {

groupnorm::ForwardEntry core_forward = nullptr;
groupnorm::BackwardEntry core_backward = nullptr;

// Inputs of this many bytes or more take the Python path (_core's _POOL_MIN_BUFFER: their outputs are pooled).
constexpr int64_t kMaxInputBytes = int64_t(1) << 20;

// The outputs' memory (y, and dx in the backward): buffers freed by earlier calls, kept for the next call that
// asks for as many bytes. A training step allocates and frees y and dx of the same sizes every step; from torch's
// allocator (malloc), the freed pair often merged into more free space at the top of the heap than glibc keeps, it
// went back to the system, and the next step's kernels wrote fresh pages ([2,512,14,14]: 4-17 page faults and about
// 10% of the step). Inputs under kMaxInputBytes only, so the cache holds at most kCacheSlots such buffers (8 MiB);
// each carries its size in a 64-byte header. Thread-safe (autograd runs backward passes on its own threads), and
// fork-safe: fork() takes the lock first and both processes release it, so a child forked while another thread was
// inside take() or release() does not inherit a lock that no thread of its own will ever release.
class OutputCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    void* base = take(bytes);
    if (base == nullptr) {
      base = std::aligned_alloc(kHeader, kHeader + (bytes + kHeader - 1) / kHeader * kHeader);
      TORCH_CHECK_WITH(OutOfMemoryError, base != nullptr, "groupnorm: no memory for an output of ", bytes,
                       " bytes");
      std::memcpy(base, &bytes, sizeof bytes);
    }
    void* data = static_cast<char*>(base) + kHeader;
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
  // Holds the lock for `microseconds`, as a thread inside take() or release() does (gn_torch_hold_output_cache).
  static void hold(int64_t microseconds) {
    std::lock_guard<std::mutex> lock(instance().mutex_);
    std::this_thread::sleep_for(std::chrono::microseconds(microseconds));
  }
  static OutputCache& instance() {
    static OutputCache* cache = [] {  // never destroyed: tensors may outlive static destruction
      OutputCache* made = new OutputCache();
#if defined(__unix__) || defined(__APPLE__)
      pthread_atfork(&lock_for_fork, &unlock_after_fork, &unlock_after_fork);
#endif
      return made;
    }();
    return *cache;
  }

 private:
  static constexpr size_t kHeader = 64;
  static constexpr int kCacheSlots = 8;

  static void lock_for_fork() { instance().mutex_.lock(); }
  static void unlock_after_fork() { instance().mutex_.unlock(); }

  static size_t size_of(void* base) {
    size_t bytes;
    std::memcpy(&bytes, base, sizeof bytes);
    return bytes;
  }
  // A kept buffer of exactly `bytes`, else null; the others keep their order, oldest first.
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (int i = 0; i < count_; ++i) {
      if (size_of(slots_[i]) != bytes) continue;
      void* base = slots_[i];
      std::memmove(slots_ + i, slots_ + i + 1, (count_ - i - 1) * sizeof(void*));
      --count_;
      return base;
    }
    return nullptr;
  }
  // Keeps a freed buffer, dropping the oldest kept one when full. A buffer of kMaxInputBytes or more (a node output
  // that resize_ grew, say) goes straight back to the system, so the cache stays within its 8 MiB.
  static void release(void* data) {
    if (data == nullptr) return;
    void* base = static_cast<char*>(data) - kHeader;
    if (size_of(base) >= size_t(kMaxInputBytes)) {
      std::free(base);
      return;
    }
    OutputCache& cache = instance();
    void* dropped = base;
    {
      std::lock_guard<std::mutex> lock(cache.mutex_);
      if (cache.count_ < kCacheSlots) {
        cache.slots_[cache.count_++] = base;
        dropped = nullptr;
      } else {
        dropped = cache.slots_[0];
        std::memmove(cache.slots_, cache.slots_ + 1, (kCacheSlots - 1) * sizeof(void*));
        cache.slots_[kCacheSlots - 1] = base;
      }
    }
    std::free(dropped);
  }

  std::mutex mutex_;
  void* slots_[kCacheSlots] = {};
  int count_ = 0;
};

// An uninitialised tensor of x's sizes, dtype and `format`, on the cache's memory.
at::Tensor output_like(const at::Tensor& x, at::MemoryFormat format) {
  return at::Tensor(at::detail::empty_generic(x.sizes(), &OutputCache::instance(),
                                              c10::DispatchKeySet(c10::DispatchKey::CPU), x.scalar_type(), format));
}

// A call this node serves: the core's problem, its dtype, and the memory format of input and outputs.
struct Plan {
  groupnorm::Problem problem;
  groupnorm::DType dtype = groupnorm::DType::kFloat32;
  at::MemoryFormat format = at::MemoryFormat::Contiguous;
};

std::optional<groupnorm::DType> core_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return groupnorm::DType::kFloat32;
    case at::kDouble:
      return groupnorm::DType::kFloat64;
    case at::kHalf:
      return groupnorm::DType::kFloat16;
    case at::kBFloat16:
      return groupnorm::DType::kBFloat16;
    default:
      return std::nullopt;
  }
}

// The dtype of the statistics, the parameters and their gradients: float64 for float64 data, else float32.
at::ScalarType compute_type(at::ScalarType data) { return data == at::kDouble ? at::kDouble : at::kFloat; }

bool plain_cpu(const at::Tensor& t) {
  return t.layout() == at::kStrided && t.device().is_cpu() && !t.is_neg() && !t.is_conj();
}

// A weight or bias the node takes: absent, or C contiguous values of the compute dtype or of the data's (a 16-bit
// model's parameters, widened for the core as groupnorm._core widens them, exactly).
bool usable_param(const std::optional<at::Tensor>& param, int64_t C, at::ScalarType compute, at::ScalarType data) {
  if (!param.has_value() || !param->defined()) return true;
  const at::Tensor& t = *param;
  return plain_cpu(t) && t.dim() == 1 && t.size(0) == C && t.is_contiguous() &&
         (t.scalar_type() == compute || t.scalar_type() == data);
}

// A parameter as the core reads it, in the compute dtype: a float16 or bfloat16 one widened to float32, exactly, in
// a loop (a dispatched .to() costs a few us, and a step widens up to four).
at::Tensor widened(const at::Tensor& t, at::ScalarType compute) {
  if (!t.defined() || t.scalar_type() == compute) return t;
  TORCH_CHECK(compute == at::kFloat, "groupnorm: only 16-bit parameters are widened; please report this");
  at::Tensor out(at::detail::empty_cpu({t.numel()}, at::kFloat, false, std::nullopt));
  float* const to = out.mutable_data_ptr<float>();
  if (t.scalar_type() == at::kBFloat16) {
    const c10::BFloat16* const from = t.const_data_ptr<c10::BFloat16>();
    for (int64_t i = 0; i < t.numel(); ++i) to[i] = float(from[i]);
  } else {
    const c10::Half* const from = t.const_data_ptr<c10::Half>();
    for (int64_t i = 0; i < t.numel(); ++i) to[i] = float(from[i]);
  }
  return out;
}

// A parameter's gradient (of the compute dtype) in the parameter's own dtype, as groupnorm.torch's _param_grad.
at::Tensor in_dtype(const at::Tensor& grad, at::ScalarType type) {
  return grad.scalar_type() == type ? grad : grad.to(type);
}

bool is_silu(const std::optional<c10::string_view>& activation) {
  return activation.has_value() && std::string_view(activation->data(), activation->size()) == "silu";
}

// The plan for a call this node serves, else nullopt.
std::optional<Plan> plan_for(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias, double eps,
                             const std::optional<c10::string_view>& activation) {
  if (core_forward == nullptr || core_backward == nullptr || !x.defined() || !plain_cpu(x) || x.dim() < 2)
    return std::nullopt;
  const auto dtype = core_dtype(x.scalar_type());
  if (!dtype || x.numel() == 0 || x.numel() * int64_t(x.element_size()) >= kMaxInputBytes) return std::nullopt;
  if (activation.has_value() && !is_silu(activation)) return std::nullopt;
  if (!(eps >= 0.0)) return std::nullopt;  // negative or NaN: the Python path says why
  Plan plan;
  plan.dtype = *dtype;
  groupnorm::Problem& p = plan.problem;
  p.N = x.size(0);
  p.C = x.size(1);
  p.G = num_groups;
  p.HxW = x.numel() / (p.N * p.C);
  p.eps = eps;
  p.activation = is_silu(activation) ? groupnorm::Activation::kSilu : groupnorm::Activation::kNone;
  if (num_groups <= 0 || p.C % num_groups != 0) return std::nullopt;
  if (x.is_contiguous()) {
    p.layout = groupnorm::Layout::kChannelsFirst;
  } else if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    p.layout = groupnorm::Layout::kChannelsLast;
    plan.format = at::MemoryFormat::ChannelsLast;
  } else if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)) {
    p.layout = groupnorm::Layout::kChannelsLast;
    plan.format = at::MemoryFormat::ChannelsLast3d;
  } else {
    return std::nullopt;
  }
  const at::ScalarType compute = compute_type(x.scalar_type());
  if (!usable_param(weight, p.C, compute, x.scalar_type()) || !usable_param(bias, p.C, compute, x.scalar_type()))
    return std::nullopt;
  return plan;
}

void check_status(groupnorm::Status status, const char* pass) {
  TORCH_CHECK_WITH(OutOfMemoryError, status != groupnorm::kOutOfMemory, "groupnorm: the ", pass,
                   " could not allocate its scratch memory");
  TORCH_CHECK(status == groupnorm::kOk, "groupnorm: the ", pass, " refused a checked call (status ", int(status),
              "); please report this");
}

const void* data_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

at::Tensor value_or_undefined(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

// y = group_norm(x) (then SiLU): the core's forward, and its backward on the statistics the forward saves.
struct GroupNormNode : public torch::autograd::Function<GroupNormNode> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, int64_t num_groups,
                            const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                            double /*eps*/, std::optional<c10::string_view> /*activation*/, const Plan& plan) {
    // eps and the activation are in the plan; the arguments are autograd's, which counts one gradient for each.
    const groupnorm::Problem& p = plan.problem;
    const at::Tensor w = value_or_undefined(weight), b = value_or_undefined(bias);
    const at::ScalarType compute = compute_type(x.scalar_type());
    at::Tensor y = output_like(x, plan.format);
    const auto stats = x.options().dtype(compute);
    at::Tensor mean = at::empty({p.N, p.G}, stats), rstd = at::empty({p.N, p.G}, stats);
    const at::Tensor w_core = widened(w, compute), b_core = widened(b, compute);
    check_status(core_forward(p, plan.dtype, x.const_data_ptr(), data_or_null(w_core), data_or_null(b_core),
                              y.mutable_data_ptr(), mean.mutable_data_ptr(), rstd.mutable_data_ptr()),
                 "forward");
    const bool silu = p.activation == groupnorm::Activation::kSilu;
    // The parameters as given: a second derivative must reach them through the graph.
    ctx->save_for_backward({x, w, silu ? b : at::Tensor(), mean, rstd});
    ctx->saved_data["num_groups"] = num_groups;
    ctx->saved_data["silu"] = silu;
    ctx->saved_data["bias_type"] = b.defined() ? int64_t(b.scalar_type()) : int64_t(-1);
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &b = saved[2], &mean = saved[3], &rstd = saved[4];
    const int64_t num_groups = ctx->saved_data["num_groups"].toInt();
    const bool silu = ctx->saved_data["silu"].toBool();
    const int64_t bias_type = ctx->saved_data["bias_type"].toInt();  // -1: no bias
    const bool has_bias = bias_type >= 0;
    const std::optional<c10::string_view> activation =
        silu ? std::optional<c10::string_view>("silu") : std::nullopt;
    at::Tensor dx, dw, db;
    if (at::GradMode::is_enabled()) {  // create_graph: gradients that autograd can differentiate again
      static const auto op =
          c10::Dispatcher::singleton()
              .findSchemaOrThrow("groupnorm::group_norm_backward", "")
              .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                  const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                  const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                  std::optional<c10::string_view>)>();
      std::tie(dx, dw, db) = op.call(grads[0], x, mean, rstd, num_groups,
                                     w.defined() ? std::optional<at::Tensor>(w) : std::nullopt,
                                     b.defined() ? std::optional<at::Tensor>(b) : std::nullopt, activation);
    } else {
      const auto plan = plan_for(x, num_groups, w, b, 0.0, activation);
      TORCH_CHECK(plan.has_value(), "groupnorm: the backward lost its forward's plan; please report this");
      const at::Tensor dy = grads[0].contiguous(plan->format);
      dx = output_like(x, plan->format);
      const at::ScalarType compute = compute_type(x.scalar_type());
      const auto params = x.options().dtype(compute);
      dw = at::empty({plan->problem.C}, params);
      db = at::empty({plan->problem.C}, params);
      const at::Tensor w_core = widened(w, compute), b_core = widened(b, compute);
      check_status(core_backward(plan->problem, plan->dtype, dy.const_data_ptr(), x.const_data_ptr(),
                                 mean.const_data_ptr(), rstd.const_data_ptr(), data_or_null(w_core),
                                 data_or_null(b_core), dx.mutable_data_ptr(), dw.mutable_data_ptr(),
                                 db.mutable_data_ptr()),
                   "backward");
      if (w.defined()) dw = in_dtype(dw, w.scalar_type());
      if (has_bias) db = in_dtype(db, at::ScalarType(bias_type));
    }
    // needs_input_grad counts the tensor arguments given (input, then weight and bias where present); the result
    // has one gradient per forward argument: input, num_groups, weight, bias, eps, activation, plan.
    const bool need_dw = w.defined() && ctx->needs_input_grad(1);
    const bool need_db = has_bias && ctx->needs_input_grad(w.defined() ? 2 : 1);
    return {ctx->needs_input_grad(0) ? dx : at::Tensor(), at::Tensor(), need_dw ? dw : at::Tensor(),
            need_db ? db : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// groupnorm_node::group_norm: [y] with the node attached, or [] for a call this node does not serve.
std::vector<at::Tensor> group_norm(const at::Tensor& input, int64_t num_groups,
                                   const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                   double eps, std::optional<c10::string_view> activation) {
  const auto plan = plan_for(input, num_groups, weight, bias, eps, activation);
  if (!plan) return {};
  return {GroupNormNode::apply(input, num_groups, weight, bias, eps, activation, *plan)};
}

}  // namespace

// The core's entry points, from groupnorm._core (the addresses of groupnorm::group_norm_forward / _backward).
extern "C" void gn_torch_bind_core(void* forward, void* backward) {
  core_forward = reinterpret_cast<groupnorm::ForwardEntry>(forward);
  core_backward = reinterpret_cast<groupnorm::BackwardEntry>(backward);
}

// For tests/test_torch_node.py: the output cache's lock held for `microseconds` on the calling thread, so that a
// fork() from another thread meanwhile can be tested (the child must still allocate).
extern "C" void gn_torch_hold_output_cache(int64_t microseconds) { OutputCache::hold(microseconds); }

TORCH_LIBRARY(groupnorm_node, m) {
  m.def("group_norm(Tensor input, int num_groups, Tensor? weight, Tensor? bias, float eps, str? activation) "
        "-> Tensor[]");
}

// Above autograd: the kernel makes its own node (GroupNormNode::apply), or none without a gradient to take.
TORCH_LIBRARY_IMPL(groupnorm_node, CompositeImplicitAutograd, m) { m.impl("group_norm", group_norm); }
