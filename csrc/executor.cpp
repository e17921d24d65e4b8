#include "executor.h"

#include <ATen/autocast_mode.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>

#include <atomic>
#include <cmath>
#include <mutex>
#include <sstream>
#include <type_traits>
#include <unordered_map>

#include "errors.h"
#include "ops.h"

namespace revengine {

using torch::autograd::Node;
using torch::autograd::variable_list;

namespace {
// torch 2.13 holds autograd nodes in c10::intrusive_ptr, earlier releases in std::shared_ptr:
// Edge::function names this torch's. (A stack's nodes chain one per layer: freeing them recursively
// is as deep as the model, so torch's deleteNode, which flattens deep chains, is not needed.)
using NodePtr = decltype(torch::autograd::Edge::function);

template <class T, class... Args>
NodePtr make_node(Args&&... args) {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<Node>>) {
    return NodePtr(new T(std::forward<Args>(args)...));
  } else {
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
  }
}
}  // namespace

// ---------------------------------------------------------------------------------------------
// Recompute flag, RNG and autocast replay

namespace {
thread_local int recompute_depth = 0;
}

bool is_recomputing() { return recompute_depth > 0; }
RecomputeGuard::RecomputeGuard() { ++recompute_depth; }
RecomputeGuard::~RecomputeGuard() { --recompute_depth; }

// ---------------------------------------------------------------------------------------------
// Side channel (records to replay, side outputs)

namespace {
thread_local LayerRecord* side_rec = nullptr;
thread_local SideMode side_mode_ = SideMode::kNone;
thread_local std::string side_label;
thread_local std::unordered_map<std::string, int> side_counts;
}  // namespace

SideMode side_mode() { return side_rec ? side_mode_ : SideMode::kNone; }

std::string side_tag(const std::string& base) {
  int n = side_counts[base]++;
  return side_label + ":" + base + "#" + std::to_string(n);
}

void side_begin_call(const std::string& fn_label) {
  side_label = fn_label;
  side_counts.clear();
}

namespace {
// Appends (tag, t) to a layer record's tagged list; a tag may appear once per layer call.
void add_tagged(std::vector<std::string>& tags, std::vector<at::Tensor>& values, const std::string& tag,
                const at::Tensor& t, const char* what) {
  for (const auto& existing : tags)
    TORCH_CHECK(existing != tag, "revengine: ", what, " '", tag, "' recorded twice in one layer call");
  tags.push_back(tag);
  values.push_back(t.detach());
}
}  // namespace

void side_save(const std::string& tag, const at::Tensor& t) {
  if (side_mode() == SideMode::kRecord) add_tagged(side_rec->saved_tags, side_rec->saved, tag, t, "record");
}

at::Tensor side_load(const std::string& tag) {
  if (side_mode() != SideMode::kReplay) return at::Tensor();
  for (size_t i = 0; i < side_rec->saved_tags.size(); ++i)
    if (side_rec->saved_tags[i] == tag) return side_rec->saved[i];
  return at::Tensor();
}

void side_emit(const std::string& tag, const at::Tensor& value) {
  if (side_mode() == SideMode::kRecord) add_tagged(side_rec->side_tags, side_rec->side_values, tag, value, "side output");
}

at::Tensor side_grad(const std::string& tag) {
  if (side_mode() != SideMode::kReplay) return at::Tensor();
  for (size_t i = 0; i < side_rec->side_tags.size() && i < side_rec->side_grads.size(); ++i)
    if (side_rec->side_tags[i] == tag) return side_rec->side_grads[i];
  return at::Tensor();
}

SideScope::SideScope(LayerRecord* rec, SideMode mode)
    : prev_rec(side_rec), prev_mode(side_mode_), prev_label(side_label) {
  side_rec = rec;
  side_mode_ = mode;
  side_label.clear();
  side_counts.clear();
}

SideScope::~SideScope() {
  side_rec = prev_rec;
  side_mode_ = prev_mode;
  side_label = prev_label;
  side_counts.clear();
}

RngSnapshot capture_rng(c10::Device device) {
  RngSnapshot s;
  auto cpu = at::detail::getDefaultCPUGenerator();
  {
    std::lock_guard<std::mutex> lock(cpu.mutex());
    s.cpu = cpu.get_state();
  }
  if (device.type() != c10::kCPU) {
    auto gen = at::globalContext().defaultGenerator(device);
    std::lock_guard<std::mutex> lock(gen.mutex());
    s.device_state = gen.get_state();
    s.device = device;
  }
  return s;
}

void restore_rng(const RngSnapshot& s) {
  if (s.cpu.defined()) {
    auto cpu = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(cpu.mutex());
    cpu.set_state(s.cpu);
  }
  if (s.device_state.defined()) {
    auto gen = at::globalContext().defaultGenerator(s.device);
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(s.device_state);
  }
}

namespace {
std::recursive_mutex rng_section_mutex;
std::atomic<BlockingWait> blocking_wait{nullptr};
}  // namespace

void set_blocking_wait(BlockingWait wait) { blocking_wait.store(wait); }

RngSection::RngSection(bool active) {
  if (!active) return;
  if (!rng_section_mutex.try_lock()) {
    BlockingWait wait = blocking_wait.load();
    if (wait)
      wait([] { rng_section_mutex.lock(); });
    else
      rng_section_mutex.lock();
  }
  held_ = true;
}

RngSection::~RngSection() {
  if (held_) rng_section_mutex.unlock();
}

namespace {

struct AutocastState {
  c10::DeviceType device_type = c10::kCPU;
  bool cpu_enabled = false;
  at::ScalarType cpu_dtype = at::kBFloat16;
  bool dev_enabled = false;
  at::ScalarType dev_dtype = at::kHalf;
  bool cache_enabled = true;

  static AutocastState capture(c10::DeviceType dev) {
    AutocastState s;
    s.device_type = dev;
    s.cpu_enabled = at::autocast::is_autocast_enabled(c10::kCPU);
    s.cpu_dtype = at::autocast::get_autocast_dtype(c10::kCPU);
    if (dev != c10::kCPU) {
      s.dev_enabled = at::autocast::is_autocast_enabled(dev);
      s.dev_dtype = at::autocast::get_autocast_dtype(dev);
    }
    s.cache_enabled = at::autocast::is_autocast_cache_enabled();
    return s;
  }
  void apply() const {
    at::autocast::set_autocast_enabled(c10::kCPU, cpu_enabled);
    at::autocast::set_autocast_dtype(c10::kCPU, cpu_dtype);
    if (device_type != c10::kCPU) {
      at::autocast::set_autocast_enabled(device_type, dev_enabled);
      at::autocast::set_autocast_dtype(device_type, dev_dtype);
    }
    at::autocast::set_autocast_cache_enabled(cache_enabled);
  }
  bool any() const { return cpu_enabled || dev_enabled; }
};

// Puts autocast in the state the forward ran under, and back on exit (like torch.autocast).
struct AutocastReplay {
  AutocastState saved;
  bool entered = false;
  explicit AutocastReplay(const AutocastState& want) : saved(AutocastState::capture(want.device_type)) {
    want.apply();
    if (want.any()) {
      at::autocast::increment_nesting();
      entered = true;
    }
  }
  ~AutocastReplay() {
    if (entered && at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    saved.apply();
  }
};

// Restores the RNG state the caller had before backward touched it.
struct RngRestore {
  bool active;
  RngSnapshot saved;
  RngRestore(bool active_, c10::Device d) : active(active_) {
    if (active) saved = capture_rng(d);
  }
  ~RngRestore() {
    if (active) restore_rng(saved);
  }
};

std::string layer_label(const std::vector<LayerPtr>& layers, size_t i) {
  std::ostringstream os;
  os << "layer " << i << " (" << layers[i]->name() << ")";
  return os.str();
}

std::string describe(const at::Tensor& t) {
  std::ostringstream os;
  os << "shape " << t.sizes() << ", dtype " << t.scalar_type() << ", device " << t.device();
  return os.str();
}

// Plain autograd refuses a backward whose saved tensors changed in place; the recompute would
// instead run silently on the new values, so it refuses too.
void check_param_versions(const LayerRecord& rec, const std::string& label) {
  for (size_t j = 0; j < rec.params.size(); ++j) {
    const at::Tensor& p = rec.params[j];
    REVENGINE_CHECK(RecomputeError, !p.defined() || p._version() == rec.param_versions[j],
                    "revengine: parameter ", j, " of ", label, " (shape ", p.sizes(),
                    ") was modified in place between the forward and the backward (version ",
                    rec.param_versions[j], " -> ", p._version(), "); the recompute needs the values the "
                    "forward used: step the optimizer after backward, or run the forward again");
  }
}

double default_debug_tol(at::ScalarType dt) {
  switch (dt) {
    case at::kDouble: return 1e-8;
    case at::kFloat: return 1e-3;
    default: return 5e-2;
  }
}

}  // namespace

at::Tensor Streams::value(const at::Tensor& buf) const {
  return exact ? ops::fixed_dequantize(buf, frac_bits, dtype) : buf;
}

std::vector<at::Tensor> vjp(const std::vector<at::Tensor>& outputs,
                            const std::vector<at::Tensor>& grad_outputs,
                            const std::vector<at::Tensor>& inputs, const std::vector<bool>& wanted) {
  std::vector<at::Tensor> result(inputs.size());
  std::vector<at::Tensor> outs, gouts, sel;
  std::vector<size_t> pos;
  for (size_t i = 0; i < outputs.size(); ++i) {
    if (outputs[i].defined() && outputs[i].requires_grad() && grad_outputs[i].defined()) {
      outs.push_back(outputs[i]);
      gouts.push_back(grad_outputs[i].to(outputs[i].scalar_type()));
    }
  }
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (wanted[i] && inputs[i].defined() && inputs[i].requires_grad()) {
      sel.push_back(inputs[i]);
      pos.push_back(i);
    }
  }
  if (outs.empty() || sel.empty()) return result;
  auto grads = torch::autograd::grad(outs, sel, gouts, /*retain_graph=*/false,
                                     /*create_graph=*/false, /*allow_unused=*/true);
  for (size_t k = 0; k < pos.size(); ++k) result[pos[k]] = grads[k];
  return result;
}

// ---------------------------------------------------------------------------------------------
// Per-call state shared by the nodes of one stack

struct StackState {
  std::vector<LayerPtr> layers;
  std::vector<LayerRecord> records;
  Ctx ctx;
  ExecOptions opts;
  AutocastState autocast;
  c10::Device device = c10::Device(c10::kCPU);
  Streams streams;                // working buffers during backward
  at::Tensor final_a, final_b;    // the stack's output (float alias, or the fixed-point buffers)
  int64_t version_a = 0, version_b = 0;
  std::shared_ptr<StackReport> report;
};

class RevNode : public Node {
 public:
  RevNode(std::shared_ptr<StackState> st, size_t index) : st_(std::move(st)), index_(index) {}
  std::string name() const override { return "RevengineLayerBackward"; }
  variable_list apply(variable_list&& grads) override;
  void release_variables() override;
  // The engine calls this before apply when the graph is not kept (no retain_graph).
  void will_release_variables() override { releasing_ = true; }

 private:
  std::shared_ptr<StackState> st_;
  size_t index_;
  bool releasing_ = false;
};

variable_list RevNode::apply(variable_list&& grads) {
  StackState& st = *st_;
  const auto& layers = st.layers;
  const size_t L = layers.size();
  const std::string label = layer_label(layers, index_);
  REVENGINE_CHECK(RecomputeError, !at::GradMode::is_enabled(),
              "revengine: double backward (create_graph=True) through a reversible stack is not "
              "supported; use mode=\"checkpoint\" or mode=\"plain\" for higher-order gradients");
  Streams& s = st.streams;
  if (index_ == L - 1) {
    REVENGINE_CHECK(RecomputeError, st.final_a.defined(),
                "revengine: trying to backward through a reversible stack a second time after its "
                "saved outputs were freed; pass retain_graph=True to the first backward");
    if (!st.opts.exact) {
      REVENGINE_CHECK(RecomputeError, st.final_a._version() == st.version_a && st.final_b._version() == st.version_b,
                  "revengine: an output of the reversible stack was modified in place after the "
                  "forward; its backward reconstructs the inputs from the outputs, so clone the "
                  "output before changing it");
    }
    // The backward rebuilds the inputs in place. When the graph is released after this backward and
    // nothing else holds the saved outputs' memory (the user's output tensors are gone), it works in
    // them directly; otherwise in fresh copies, so the outputs stay intact for retain_graph and the user.
    auto sole = [](const at::Tensor& t) { return t.is_contiguous() && t.storage().use_count() == 1; };
    if (releasing_ && sole(st.final_a) && sole(st.final_b)) {
      s.a = st.final_a;
      s.b = st.final_b;
      st.final_a.reset();
      st.final_b.reset();
    } else {
      s.a = st.final_a.clone(at::MemoryFormat::Contiguous);
      s.b = st.final_b.clone(at::MemoryFormat::Contiguous);
    }
  }
  TORCH_INTERNAL_ASSERT(s.a.defined() && s.b.defined(),
                        "revengine: backward of ", label, " ran before the layer above it");

  const at::Tensor shape_ref = s.value(s.a);
  auto grad_or_zeros = [&](const at::Tensor& g) {
    return g.defined() ? g : at::zeros_like(shape_ref, shape_ref.options().dtype(s.dtype));
  };
  at::Tensor dya = grad_or_zeros(grads[0]);
  at::Tensor dyb = grad_or_zeros(grads[1]);

  const size_t np = st.records[index_].params.size();  // the node's outputs 2 .. 2 + np - 1
  const size_t nc = st.ctx.tensors.size();
  Needs needs;
  needs.streams = should_compute_output(0) || should_compute_output(1);
  needs.params.resize(np);
  needs.ctx.resize(nc);
  for (size_t j = 0; j < np; ++j) needs.params[j] = should_compute_output(2 + j);
  for (size_t k = 0; k < nc; ++k) needs.ctx[k] = should_compute_output(2 + np + k);

  LayerRecord& rec_mut = st.records[index_];
  rec_mut.side_grads.assign(rec_mut.side_tags.size(), at::Tensor());
  for (size_t k = 0; k < rec_mut.side_tags.size() && 2 + k < grads.size(); ++k)
    rec_mut.side_grads[k] = grads[2 + k];

  check_param_versions(rec_mut, label);
  for (size_t k = 0; k < rec_mut.packed.size(); ++k) rec_mut.saved[k] = rec_mut.packed[k].unpack();
  BackwardResult r;
  {
    RngSection rng_section(st.opts.preserve_rng);
    RngRestore rng_guard(st.opts.preserve_rng, st.device);
    AutocastReplay autocast_guard(st.autocast);
    at::AutoGradMode grad_on(true);
    SideScope side(&rec_mut, SideMode::kReplay);
    r = layers[index_]->backward(s, dya, dyb, st.ctx, rec_mut, needs);
  }
  rec_mut.side_grads.clear();
  for (auto& t : rec_mut.saved) t.reset();  // unpacked again by a retained graph's next backward
  REVENGINE_CHECK(ReconstructionError, r.finite, "revengine: non-finite value (NaN or Inf) in the input of ", label,
              " reconstructed during backward. The forward may have overflowed, or the layer's "
              "inverse amplifies error (e.g. a small lam/beta). Sequential(..., debug=True) compares "
              "each reconstruction with the true input.");
  const LayerRecord& rec = st.records[index_];
  if (rec.debug_a.defined()) {
    at::NoGradGuard ng;
    double err = std::max((s.value(s.a) - rec.debug_a).abs().max().item<double>(),
                          (s.value(s.b) - rec.debug_b).abs().max().item<double>());
    st.report->reconstruction_errors[index_] = err;
    double tol = st.opts.debug_tol >= 0 ? st.opts.debug_tol : default_debug_tol(s.dtype);
    double scale = std::max(1.0, rec.debug_a.abs().max().item<double>());
    REVENGINE_CHECK(ReconstructionError, err <= tol * scale, "revengine: ", label, " did not invert its forward: the "
                "reconstructed input differs from the true input by ", err, " (tolerance ",
                tol * scale, "). Check that its inverse undoes its forward (revengine.testing.check_layer).");
  }

  variable_list out(2 + np + nc);
  out[0] = r.da;
  out[1] = r.db;
  for (size_t j = 0; j < np && j < r.dparams.size(); ++j) out[2 + j] = r.dparams[j];
  for (size_t k = 0; k < nc && k < r.dctx.size(); ++k) out[2 + np + k] = r.dctx[k];
  return out;
}

void RevNode::release_variables() {
  StackState& st = *st_;
  if (index_ == st.layers.size() - 1) {
    st.final_a.reset();
    st.final_b.reset();
  }
  st.records[index_] = LayerRecord();
  if (index_ == 0) {
    st.streams.a.reset();
    st.streams.b.reset();
  }
}

// ---------------------------------------------------------------------------------------------

namespace {

void check_streams(const at::Tensor& a, const at::Tensor& b, const std::string& where) {
  TORCH_CHECK(a.defined() && b.defined(), "revengine: ", where, ": both streams must be tensors");
  TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() && a.device() == b.device(),
              "revengine: ", where, ": the two streams must match in shape, dtype and device, got ",
              describe(a), " and ", describe(b));
  TORCH_CHECK(at::isFloatingType(a.scalar_type()), "revengine: ", where,
              ": streams must be floating point, got ", a.scalar_type());
}

Streams make_streams(const at::Tensor& xa, const at::Tensor& xb, const ExecOptions& opts) {
  Streams s;
  s.exact = opts.exact;
  s.frac_bits = opts.frac_bits;
  s.dtype = xa.scalar_type();
  s.check_finite = opts.check_finite;
  s.preserve_rng = opts.preserve_rng;
  at::NoGradGuard ng;
  if (opts.exact) {
    s.a = ops::fixed_quantize(xa, opts.frac_bits);
    s.b = ops::fixed_quantize(xb, opts.frac_bits);
  } else {
    // Owned copies: the user's input is never written to.
    s.a = xa.detach().clone(at::MemoryFormat::Contiguous);
    s.b = xb.detach().clone(at::MemoryFormat::Contiguous);
  }
  return s;
}

void check_exact(const std::vector<LayerPtr>& layers, const ExecOptions& opts) {
  if (!opts.exact) return;
  TORCH_CHECK(opts.frac_bits >= 0 && opts.frac_bits <= 52, "revengine: exact_bits must be in [0, 52], got ",
              opts.frac_bits);
  for (size_t i = 0; i < layers.size(); ++i) {
    TORCH_CHECK(layers[i]->supports_exact(), "revengine: exact=True needs layers that only add and "
                "subtract increments (AdditiveCoupling with lam=beta=1, ...), but ", layer_label(layers, i),
                " does not support it");
  }
}

}  // namespace

ForwardResult reversible_forward(const std::vector<LayerPtr>& layers, const at::Tensor& xa,
                                 const at::Tensor& xb, const Ctx& ctx, const ExecOptions& opts) {
  check_streams(xa, xb, "input of the reversible stack");
  check_exact(layers, opts);
  const size_t L = layers.size();
  ForwardResult result;
  result.report = std::make_shared<StackReport>();
  result.report->reconstruction_errors.assign(L, -1.0);
  if (L == 0) {
    result.a = xa;
    result.b = xb;
    return result;
  }

  std::vector<std::vector<at::Tensor>> params(L);
  bool any_requires_grad = xa.requires_grad() || xb.requires_grad();
  for (const auto& t : ctx.tensors) any_requires_grad |= (t.defined() && t.requires_grad());
  for (size_t i = 0; i < L; ++i) {
    params[i] = layers[i]->parameters();
    for (const auto& p : params[i]) any_requires_grad |= p.requires_grad();
  }
  const bool record = at::GradMode::is_enabled() && any_requires_grad;
  if (record && opts.check_finite) {
    // Said here, not later as a failed reconstruction in backward.
    TORCH_CHECK_VALUE(ops::all_finite(xa).item<bool>() && ops::all_finite(xb).item<bool>(),
                      "revengine: the input of the reversible stack holds NaN or Inf (", describe(xa),
                      "); backward would reconstruct every layer from it (check_finite=False skips this check)");
  }

  auto st = std::make_shared<StackState>();
  Streams s = make_streams(xa, xb, opts);
  s.recording = record;
  const auto shape = xa.sizes().vec();
  const auto float_opts = xa.options();
  at::Tensor prev_a = xa, prev_b = xb;
  if (record) {
    st->layers = layers;
    st->ctx = ctx;
    st->opts = opts;
    st->device = xa.device();
    st->autocast = AutocastState::capture(xa.device().type());
    st->report = result.report;
    st->records.reserve(L);
  }

  for (size_t i = 0; i < L; ++i) {
    LayerRecord rec;
    if (record && opts.debug) {
      at::NoGradGuard ng;
      rec.debug_a = s.value(s.a).clone();
      rec.debug_b = s.value(s.b).clone();
    }
    {
      at::NoGradGuard ng;
      RngSection rng_section(record && opts.preserve_rng);
      SideScope side(&rec, SideMode::kRecord);
      layers[i]->forward(s, ctx, rec);
    }
    std::vector<at::Tensor> side_values = std::move(rec.side_values);
    rec.side_values.clear();
    result.side_tags.insert(result.side_tags.end(), rec.side_tags.begin(), rec.side_tags.end());
    const auto want = opts.exact ? at::kLong : s.dtype;
    TORCH_CHECK(s.a.defined() && s.b.defined() && s.a.sizes() == at::IntArrayRef(shape) &&
                    s.b.sizes() == at::IntArrayRef(shape) && s.a.scalar_type() == want &&
                    s.b.scalar_type() == want && s.a.device() == xa.device() && s.b.device() == xa.device(),
                "revengine: ", layer_label(layers, i), " changed its streams: expected ", describe(xa),
                " for both, got ", describe(s.a), " and ", describe(s.b));
    if (!record) {
      rec.saved.clear();
      result.side.insert(result.side.end(), side_values.begin(), side_values.end());
      continue;
    }

    NodePtr node = make_node<RevNode>(st, i);
    variable_list inputs{prev_a, prev_b};
    inputs.insert(inputs.end(), params[i].begin(), params[i].end());
    inputs.insert(inputs.end(), ctx.tensors.begin(), ctx.tensors.end());
    node->set_next_edges(torch::autograd::collect_next_edges(inputs));
    for (auto& t : rec.saved) {  // through the saved-tensor hooks, if any (they may move t off the device)
      rec.packed.emplace_back(t, /*is_output=*/false);
      t.reset();
    }
    rec.params = params[i];
    rec.param_versions.reserve(params[i].size());
    for (const auto& p : params[i]) rec.param_versions.push_back(p.defined() ? p._version() : 0);
    st->records.push_back(std::move(rec));

    at::Tensor out_a, out_b;
    if (i + 1 < L) {
      // Intermediate outputs only carry autograd metadata: their values live in the buffers.
      std::vector<int64_t> zero_strides(shape.size(), 0);
      out_a = at::empty_strided(shape, zero_strides, float_opts);
      out_b = at::empty_strided(shape, zero_strides, float_opts);
    } else if (opts.exact) {
      at::NoGradGuard ng;
      out_a = s.value(s.a);
      out_b = s.value(s.b);
      st->final_a = s.a;
      st->final_b = s.b;
    } else {
      out_a = s.a;
      out_b = s.b;
    }
    torch::autograd::set_history(out_a, node);
    torch::autograd::set_history(out_b, node);
    for (auto& v : side_values) {
      // Side outputs are fresh tensors (the node's outputs 2, 3, ...), not views of anything.
      at::Tensor out = v.clone();
      torch::autograd::set_history(out, node);
      result.side.push_back(out);
    }
    if (i + 1 == L && !opts.exact) {
      // Detached aliases share storage and version counter (no reference cycle to the node).
      st->final_a = out_a.detach();
      st->final_b = out_b.detach();
      st->version_a = st->final_a._version();
      st->version_b = st->final_b._version();
    }
    prev_a = out_a;
    prev_b = out_b;
  }
  if (record) {
    st->streams = s;
    st->streams.a.reset();
    st->streams.b.reset();
    result.a = prev_a;
    result.b = prev_b;
  } else {
    at::NoGradGuard ng;
    result.a = s.value(s.a);
    result.b = s.value(s.b);
  }
  return result;
}

std::pair<at::Tensor, at::Tensor> reversible_inverse(const std::vector<LayerPtr>& layers,
                                                     const at::Tensor& ya, const at::Tensor& yb,
                                                     const Ctx& ctx, const ExecOptions& opts) {
  check_streams(ya, yb, "input of Sequential.inverse");
  check_exact(layers, opts);
  at::NoGradGuard ng;
  Streams s = make_streams(ya, yb, opts);
  for (size_t k = layers.size(); k-- > 0;) {
    bool finite = layers[k]->inverse(s, ctx);
    REVENGINE_CHECK(ReconstructionError, finite, "revengine: non-finite value (NaN or Inf) in the input of ", layer_label(layers, k),
                " reconstructed by inverse()");
  }
  return {s.value(s.a), s.value(s.b)};
}

}  // namespace revengine
