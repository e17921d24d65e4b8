// Built-in reversible layers with fused backward: the reconstruction of each stream doubles as
// the recompute, so every stream function runs once in forward and once (with grad) in backward,
// the same cost as activation checkpointing.
#pragma once
#include "executor.h"

namespace revengine {

// Unique parameters of several stream functions, and where each function's parameters land.
struct ParamIndex {
  std::vector<at::Tensor> params;
  std::vector<std::vector<size_t>> slots;  // slots[fn][j] = index in params
  static ParamIndex build(const std::vector<std::vector<at::Tensor>>& per_fn);
  // Function fn's parameters, as captured by build (backward uses these, no call back into Python).
  std::vector<at::Tensor> of(size_t fn) const;
};

// y1 = lam*x1 + f(x2); y2 = beta*x2 + g(y1)  (Reformer/RevNet, with MEFT's scales)
class AdditiveCoupling : public Layer {
 public:
  AdditiveCoupling(FnPtr f, FnPtr g, double lam = 1.0, double beta = 1.0);
  std::string name() const override { return "AdditiveCoupling"; }
  std::vector<at::Tensor> parameters() override;
  bool supports_exact() const override { return lam_ == 1.0 && beta_ == 1.0; }
  void forward(Streams& s, const Ctx& ctx, LayerRecord& rec) override;
  BackwardResult backward(Streams& s, const at::Tensor& dya, const at::Tensor& dyb, const Ctx& ctx,
                          const LayerRecord& rec, const Needs& needs) override;
  bool inverse(Streams& s, const Ctx& ctx) override;

 private:
  FnPtr f_, g_;
  double lam_, beta_;
  ParamIndex index_;
};

// y1 = x1*exp(c*tanh(fs(x2)/c)) + ft(x2); y2 = x2*exp(c*tanh(gs(y1)/c)) + gt(y1)
// The scale's log is soft-clamped to (-c, c), so the inverse never divides by ~0.
class AffineCoupling : public Layer {
 public:
  AffineCoupling(FnPtr fs, FnPtr ft, FnPtr gs, FnPtr gt, double clamp = 2.0);
  std::string name() const override { return "AffineCoupling"; }
  std::vector<at::Tensor> parameters() override;
  void forward(Streams& s, const Ctx& ctx, LayerRecord& rec) override;
  BackwardResult backward(Streams& s, const at::Tensor& dya, const at::Tensor& dyb, const Ctx& ctx,
                          const LayerRecord& rec, const Needs& needs) override;
  bool inverse(Streams& s, const Ctx& ctx) override;

 private:
  at::Tensor scale_of(const at::Tensor& raw) const;
  FnPtr fs_, ft_, gs_, gt_;
  double clamp_;
  ParamIndex index_;
};

// Two-step integrators (Gal et al.) as one layer family. The layer updates buffer U from source S:
//   U' = c_prev*U + c_cur*S + c_f*f(S)
// With swap (midpoint, leapfrog, stochastic midpoint) the streams (p_prev, p) become (p, p_next):
// U = a, S = b, then the buffers swap. Without swap (the Euler start) U = b, S = a: (p0, p0) ->
// (p0, p0 + h f(p0)). The inverse solves for U, so c_prev must be non-zero; it is bit-exact in
// fixed point when c_prev = +-1 and c_cur is an integer (midpoint, leapfrog, Euler).
class LinearMultistep : public Layer {
 public:
  LinearMultistep(FnPtr f, double c_prev, double c_cur, double c_f, bool swap, std::string name);
  std::string name() const override { return name_; }
  std::vector<at::Tensor> parameters() override {
    params_ = f_->parameters();
    return params_;
  }
  bool supports_exact() const override;
  void forward(Streams& s, const Ctx& ctx, LayerRecord& rec) override;
  BackwardResult backward(Streams& s, const at::Tensor& dya, const at::Tensor& dyb, const Ctx& ctx,
                          const LayerRecord& rec, const Needs& needs) override;
  bool inverse(Streams& s, const Ctx& ctx) override;

 private:
  void step(Streams& s, at::Tensor& u, const at::Tensor& src, const at::Tensor& inc, int dir);
  bool solve(Streams& s, at::Tensor& u, const at::Tensor& src, const at::Tensor& inc);
  FnPtr f_;
  std::vector<at::Tensor> params_;  // as of the last parameters() call (the node's inputs)
  double c_prev_, c_cur_, c_f_;
  bool swap_;
  std::string name_;
};

// BDIA (Zhang, Lewis & Kleijn, "exact bit-level reversible transformers"): the streams
// (p_prev, p) become (p, p_next) with
//   p_next = g*p_prev + (1-g)*p + (1+g)*f(p),
// g = +-gamma drawn per sample (dim 0) at every training forward, recorded for backward. In
// eval mode g = 0: p + f(p), the residual update of the network it was converted from, which
// is not invertible: the layer then keeps its input p_prev (exact grads, no memory saving).
// The inverse divides by g; in fixed point (exact=True, gamma = 2^-k) g*p_prev is computed as
// +-(P_prev >> k) and the k low bits the shift drops are recorded, so the inverse is bit-exact.
class BDIA : public Layer {
 public:
  BDIA(FnPtr f, double gamma, std::string name);
  // k with gamma = 2^-k, k = 1..8: the gammas whose g*p_prev is an exact shift on the fixed-point
  // grid (exact mode); 0 for any other gamma. The one statement of that rule (the config asks it).
  static int64_t exact_shift(double gamma);
  std::string name() const override { return name_; }
  std::vector<at::Tensor> parameters() override {
    params_ = f_->parameters();
    return params_;
  }
  bool supports_exact() const override { return shift_ > 0; }
  void set_training(bool training) { training_ = training; }
  bool training() const { return training_; }
  void forward(Streams& s, const Ctx& ctx, LayerRecord& rec) override;
  BackwardResult backward(Streams& s, const at::Tensor& dya, const at::Tensor& dyb, const Ctx& ctx,
                          const LayerRecord& rec, const Needs& needs) override;
  bool inverse(Streams& s, const Ctx& ctx) override;

 private:
  FnPtr f_;
  std::vector<at::Tensor> params_;
  double gamma_;
  int64_t shift_;  // k with gamma = 2^-k (1..8), else 0: no exact mode
  bool training_ = true;
  std::string name_;
};

// Helpers shared by layers (and by Python-defined layers in python.cpp).
at::Tensor grad_leaf(const Streams& s, const at::Tensor& buf);
// Leaves standing in for the context tensors during a recompute (grad wanted where needs say so).
Ctx leaf_context(const Ctx& ctx, const std::vector<bool>& needs);
void check_increment(const at::Tensor& inc, const at::Tensor& stream, const char* fn_name,
                     const std::string& layer);

}  // namespace revengine
