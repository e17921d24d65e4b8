// The reversible executor: each layer of a stack is one C++ autograd node. Forward runs the
// layers in place on two stream buffers the executor owns, without recording a graph; backward
// walks the layers in reverse, reconstructs each layer's input from its output in those buffers,
// re-runs the layer with grad and returns the vector-Jacobian products for the streams, the
// layer's parameters and the context tensors. Python-free: the CMake build links this file into
// plain C++ programs, and python.cpp adapts Python modules to the Fn / Layer interfaces below.
#pragma once
#include <ATen/ATen.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/autograd/variable.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace revengine {

// Non-tensor part of the context (Python keeps its kwargs template here).
struct CtxExtra {
  virtual ~CtxExtra() = default;
};

// Context passed to every layer: tensors (grads flow to those that require grad) plus an
// opaque extra part.
struct Ctx {
  std::vector<at::Tensor> tensors;
  std::shared_ptr<CtxExtra> extra;
  Ctx with_tensors(std::vector<at::Tensor> ts) const { return Ctx{std::move(ts), extra}; }
};

// One stream function (f or g of a coupling): increment = call(x, ctx).
struct Fn {
  virtual ~Fn() = default;
  virtual at::Tensor call(const at::Tensor& x, const Ctx& ctx) = 0;
  virtual std::vector<at::Tensor> parameters() = 0;
  virtual std::string name() const { return "fn"; }
};
using FnPtr = std::shared_ptr<Fn>;

// RNG state of the CPU generator and, for accelerator streams, of the device generator.
struct RngSnapshot {
  at::Tensor cpu;
  at::Tensor device_state;
  c10::Device device = c10::Device(c10::kCPU);
};
RngSnapshot capture_rng(c10::Device device);
void restore_rng(const RngSnapshot& s);

// The process-wide RNG section. A layer's recorded forward (snapshot, then the draws it stands
// for) and its recompute (restore, then the same draws) each run inside it, so draws made by
// other threads' stacks cannot fall between a snapshot and its draws: every recompute replays
// exactly the masks its forward drew. Recursive (a layer may run a stack of its own); inactive
// sections cost nothing.
class RngSection {
 public:
  explicit RngSection(bool active = true);
  ~RngSection();
  RngSection(const RngSection&) = delete;
  RngSection& operator=(const RngSection&) = delete;

 private:
  bool held_ = false;
};
// How a thread blocks on the section: Python's binding releases the GIL while it waits (the
// holder may need the GIL to finish its layer).
using BlockingWait = void (*)(const std::function<void()>& wait);
void set_blocking_wait(BlockingWait wait);

// What a layer's forward recorded for its recompute.
struct LayerRecord {
  std::vector<RngSnapshot> rng;    // one per stream-function call, in forward order
  // Small records the layer's functions asked to replay (e.g. MoE top-k indices), by tag.
  std::vector<std::string> saved_tags;
  std::vector<at::Tensor> saved;
  // Between the layer's forward and its backward the records live here, packed by the saved-tensor
  // hooks in force at the forward (torch.autograd.graph.saved_tensors_hooks, save_on_cpu), like any
  // tensor autograd saves; `saved` is empty then, and refilled for the backward.
  std::vector<torch::autograd::SavedVariable> packed;
  // Side outputs (e.g. MoE aux losses): scalars the layer's functions emitted in forward. They
  // become extra outputs of the layer's autograd node; backward hands their grads back by tag.
  std::vector<std::string> side_tags;
  std::vector<at::Tensor> side_values;  // forward only (moved into the node's outputs)
  std::vector<at::Tensor> side_grads;   // backward only (aligned with side_tags)
  at::Tensor debug_a, debug_b;          // true inputs, kept only in debug mode
  // The layer's parameters and their version counters at forward: the recompute must see the
  // values the forward used, so a parameter changed in place in between is an error.
  std::vector<at::Tensor> params;
  std::vector<int64_t> param_versions;
};

// The side channel between the executor and the stream functions it runs. While a layer runs
// (forward or backward), its record is current; functions save/replay records and emit side
// outputs through it, keyed by tags that repeat identically in the recompute.
enum class SideMode { kNone = 0, kRecord = 1, kReplay = 2 };
SideMode side_mode();
// Makes a tag unique within the current stream-function call: base#n for the n-th use of base.
std::string side_tag(const std::string& base);
// Called at the start of every stream-function call (resets the per-call tag counters).
void side_begin_call(const std::string& fn_label);
void side_save(const std::string& tag, const at::Tensor& t);   // kRecord
at::Tensor side_load(const std::string& tag);                  // kReplay (undefined if absent)
void side_emit(const std::string& tag, const at::Tensor& value);  // kRecord
at::Tensor side_grad(const std::string& tag);                  // kReplay (undefined: no grad)
struct SideScope {  // makes rec current for the scope
  SideScope(LayerRecord* rec, SideMode mode);
  ~SideScope();
  LayerRecord* prev_rec;
  SideMode prev_mode;
  std::string prev_label;
};

// The two stream buffers and how they are stored (float, or fixed point when exact).
struct Streams {
  at::Tensor a, b;
  bool exact = false;
  int64_t frac_bits = 16;
  at::ScalarType dtype = at::kFloat;  // floating dtype the layers see
  bool check_finite = true;
  bool preserve_rng = true;
  // False in a forward that records nothing for backward (no_grad, or nothing requires grad):
  // layers may skip what only their backward would use.
  bool recording = true;
  // The layers' view of a buffer: the buffer itself, or its dequantised value.
  at::Tensor value(const at::Tensor& buf) const;
  // Which grads the current backward needs.
};

struct Needs {
  bool streams = true;
  std::vector<bool> params;  // aligned with Layer::parameters()
  std::vector<bool> ctx;     // aligned with Ctx::tensors
};

struct BackwardResult {
  at::Tensor da, db;
  std::vector<at::Tensor> dparams;  // aligned with Layer::parameters(); undefined = no grad
  std::vector<at::Tensor> dctx;     // aligned with Ctx::tensors
  bool finite = true;               // every reconstructed value finite
};

class Layer {
 public:
  virtual ~Layer() = default;
  virtual std::string name() const = 0;
  // Unique parameters of the layer; they become explicit inputs of its autograd node.
  virtual std::vector<at::Tensor> parameters() = 0;
  virtual bool supports_exact() const { return false; }
  // s holds the layer's input; on return it holds its output. Runs without grad.
  virtual void forward(Streams& s, const Ctx& ctx, LayerRecord& rec) = 0;
  // s holds the layer's output; on return it holds the reconstructed input. dy* are defined.
  virtual BackwardResult backward(Streams& s, const at::Tensor& dya, const at::Tensor& dyb,
                                  const Ctx& ctx, const LayerRecord& rec, const Needs& needs) = 0;
  // s holds the output; on return the reconstructed input. Runs without grad. Returns finite flag.
  virtual bool inverse(Streams& s, const Ctx& ctx) = 0;
};
using LayerPtr = std::shared_ptr<Layer>;

struct ExecOptions {
  bool exact = false;
  int64_t frac_bits = 16;
  bool check_finite = true;
  bool preserve_rng = true;
  bool debug = false;       // keep true inputs, compare reconstructions in backward
  double debug_tol = -1.0;  // < 0: a default chosen from the dtype
};

// Per-call handle, kept alive by the autograd nodes; exposes debug figures.
struct StackState;
struct StackReport {
  std::vector<double> reconstruction_errors;  // max |x_rec - x| per layer (debug mode), -1 = not run
};

struct ForwardResult {
  at::Tensor a, b;
  std::vector<std::string> side_tags;  // side outputs of every layer, in layer order
  std::vector<at::Tensor> side;        // (outputs of the layers' autograd nodes when recording)
  std::shared_ptr<StackReport> report;
};

// Runs the layers over the streams (xa, xb). With grad enabled and anything requiring grad,
// the outputs carry one autograd node per layer; otherwise this is a plain in-place forward.
ForwardResult reversible_forward(const std::vector<LayerPtr>& layers, const at::Tensor& xa,
                                 const at::Tensor& xb, const Ctx& ctx, const ExecOptions& opts);
// Computes the stack's input from its output, layer by layer in reverse, without grad.
std::pair<at::Tensor, at::Tensor> reversible_inverse(const std::vector<LayerPtr>& layers,
                                                     const at::Tensor& ya, const at::Tensor& yb,
                                                     const Ctx& ctx, const ExecOptions& opts);

// True while the executor re-runs a layer in backward (modules use it to skip state updates).
bool is_recomputing();
struct RecomputeGuard {
  RecomputeGuard();
  ~RecomputeGuard();
};

// Grad helper: autograd::grad over the inputs whose flag is set; undefined for the others.
std::vector<at::Tensor> vjp(const std::vector<at::Tensor>& outputs,
                            const std::vector<at::Tensor>& grad_outputs,
                            const std::vector<at::Tensor>& inputs, const std::vector<bool>& wanted);

}  // namespace revengine
