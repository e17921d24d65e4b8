// C++ consumers' view of the executor: a reversible stack of torch::nn modules, its gradients
// checked against plain autograd through the same modules (float64), and the reconstruction.
#include <torch/torch.h>

#include <cmath>
#include <iostream>

#include "errors.h"
#include "layers.h"
#include "module_fn.h"

using namespace revengine;

namespace {

int failures = 0;

void expect(bool ok, const std::string& what, double value) {
  std::cout << (ok ? "PASS " : "FAIL ") << what << " = " << value << std::endl;
  if (!ok) ++failures;
}

torch::nn::Sequential mlp(int64_t d) {
  return torch::nn::Sequential(torch::nn::Linear(d, 4 * d), torch::nn::GELU(), torch::nn::Linear(4 * d, d));
}

double rel_err(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>() / std::max(1e-300, b.abs().max().item<double>());
}

}  // namespace

int main() {
  torch::manual_seed(0);
  const int64_t d = 16, depth = 16;
  std::vector<torch::nn::Sequential> fs, gs;
  std::vector<LayerPtr> layers;
  for (int64_t i = 0; i < depth; ++i) {
    fs.push_back(mlp(d));
    gs.push_back(mlp(d));
    fs.back()->to(torch::kFloat64);
    gs.back()->to(torch::kFloat64);
    layers.push_back(std::make_shared<AdditiveCoupling>(module_fn(fs.back(), "f"), module_fn(gs.back(), "g"), 0.9, 1.1));
  }
  auto opts = torch::TensorOptions().dtype(torch::kFloat64);
  at::Tensor x1 = torch::randn({8, d}, opts).requires_grad_(true);
  at::Tensor x2 = torch::randn({8, d}, opts).requires_grad_(true);
  at::Tensor w = torch::randn({8, d}, opts);

  // Grads of a fixed loss of the outputs w.r.t. the inputs and every parameter of `stack`.
  auto grads_of = [&](const std::vector<LayerPtr>& stack, const at::Tensor& y1, const at::Tensor& y2) {
    at::Tensor loss = (y1 * w).sum() + (y2 * y2).sum();
    std::vector<at::Tensor> inputs{x1, x2};
    for (auto& l : stack) {
      auto p = l->parameters();
      inputs.insert(inputs.end(), p.begin(), p.end());
    }
    return torch::autograd::grad({loss}, inputs);
  };

  // Plain autograd through the same modules.
  at::Tensor p1 = x1, p2 = x2;
  for (int64_t i = 0; i < depth; ++i) {
    p1 = 0.9 * p1 + fs[i]->forward(p2);
    p2 = 1.1 * p2 + gs[i]->forward(p1);
  }
  auto plain = grads_of(layers, p1, p2);

  ExecOptions eo;
  auto res = reversible_forward(layers, x1, x2, Ctx{}, eo);
  expect(rel_err(res.a, p1) < 1e-12 && rel_err(res.b, p2) < 1e-12, "forward rel err", rel_err(res.a, p1));
  auto rev = grads_of(layers, res.a, res.b);
  double worst = 0;
  for (size_t k = 0; k < plain.size(); ++k) worst = std::max(worst, rel_err(rev[k], plain[k]));
  expect(worst <= 1e-10, "max grad rel err vs plain autograd (float64, depth 16)", worst);

  // The grad_fn of the output is the executor's own C++ node.
  expect(res.a.grad_fn() && res.a.grad_fn()->name() == "RevengineLayerBackward", "grad_fn is the C++ node", 1);

  {
    torch::NoGradGuard ng;
    auto back = reversible_inverse(layers, res.a.detach(), res.b.detach(), Ctx{}, eo);
    double err = std::max((back.first - x1).abs().max().item<double>(), (back.second - x2).abs().max().item<double>());
    expect(err < 1e-10, "inverse reconstruction max abs err", err);
  }
  // The caller's inputs are untouched (the executor works in its own buffers).
  expect(x1.is_leaf() && x1._version() == 0 && x2._version() == 0, "input versions unchanged", 0);

  // BDIA from C++: the signs drawn by the executor (one randint per layer, before f) are replayed by
  // the reference after the same seed; float (gamma 1/2) against plain autograd, then the exact
  // (fixed-point) stack reconstructs every layer bit for bit.
  {
    const int64_t bd = 8;
    std::vector<torch::nn::Sequential> bf;
    std::vector<LayerPtr> bl;
    for (int64_t i = 0; i < bd; ++i) {
      bf.push_back(mlp(d));
      bf.back()->to(torch::kFloat64);
      bl.push_back(std::make_shared<BDIA>(module_fn(bf.back(), "f"), 0.5, "BDIA"));
    }
    torch::manual_seed(7);
    at::Tensor a = x1, b = x2;
    for (int64_t i = 0; i < bd; ++i) {
      at::Tensor g = (torch::randint(0, 2, {8}, torch::kLong) * 2 - 1).to(torch::kFloat64).mul(0.5).view({8, 1});
      at::Tensor next = g * a + (1 - g) * b + (1 + g) * bf[i]->forward(b);
      a = b;
      b = next;
    }
    auto bplain = grads_of(bl, a, b);
    torch::manual_seed(7);
    auto bres = reversible_forward(bl, x1, x2, Ctx{}, eo);
    auto brev = grads_of(bl, bres.a, bres.b);
    double bworst = 0;
    for (size_t k = 0; k < bplain.size(); ++k) bworst = std::max(bworst, rel_err(brev[k], bplain[k]));
    expect(bworst <= 1e-10, "BDIA max grad rel err vs plain autograd (float64, depth 8)", bworst);

    std::vector<LayerPtr> exact_layers;
    for (int64_t i = 0; i < bd; ++i) exact_layers.push_back(std::make_shared<BDIA>(module_fn(bf[i], "f"), 0.0625, "BDIA"));
    ExecOptions ex;
    ex.exact = true;
    ex.frac_bits = 24;
    ex.debug = true;
    ex.debug_tol = 0.0;
    auto eres = reversible_forward(exact_layers, x1, x2, Ctx{}, ex);
    auto egrads = grads_of(exact_layers, eres.a, eres.b);  // backward reconstructs; debug compares with the true inputs
    double worst_rec = -1;  // -1 in the report: a layer that was not checked
    int64_t checked = 0;
    for (double e : eres.report->reconstruction_errors) {
      worst_rec = std::max(worst_rec, e);
      checked += e >= 0.0;
    }
    expect(checked == bd && worst_rec == 0.0 && egrads[0].isfinite().all().item<bool>(),
           "BDIA exact (gamma 1/16): worst reconstruction error over 8 layers", worst_rec);
  }

  // The executor's errors arrive as their C++ types, also from inside the autograd engine.
  {
    auto res2 = reversible_forward(layers, x1, x2, Ctx{}, eo);
    {
      torch::NoGradGuard ng;
      res2.a.add_(1);
    }
    bool recompute = false;
    try {
      grads_of(layers, res2.a, res2.b);
    } catch (const RecomputeError& e) {
      recompute = std::string(e.what()).find("modified in place") != std::string::npos;
    }
    expect(recompute, "output changed in place: RecomputeError", recompute);

    ExecOptions dbg;
    dbg.debug = true;
    at::Tensor weight = fs[0]->parameters()[0];
    // A parameter changed in place between forward and backward: the recompute refuses it.
    auto res4 = reversible_forward(layers, x1, x2, Ctx{}, ExecOptions{});
    {
      torch::NoGradGuard ng;
      weight.add_(0.5);
    }
    bool versions = false;
    try {
      grads_of(layers, res4.a, res4.b);
    } catch (const RecomputeError& e) {
      versions = std::string(e.what()).find("parameter 0 of layer 0 (AdditiveCoupling)") != std::string::npos;
    }
    {
      torch::NoGradGuard ng;
      weight.sub_(0.5);
    }
    expect(versions, "parameter changed in place: RecomputeError", versions);

    auto res3 = reversible_forward(layers, x1, x2, Ctx{}, dbg);
    // Values changed behind the version counter (variable_data() has its own): layer 0's inverse
    // no longer undoes the forward that ran, which only debug mode can see.
    weight.variable_data().add_(0.5);
    bool reconstruction = false;
    try {
      grads_of(layers, res3.a, res3.b);
    } catch (const ReconstructionError& e) {
      reconstruction = std::string(e.what()).find("layer 0 (AdditiveCoupling) did not invert") != std::string::npos;
    }
    weight.variable_data().sub_(0.5);
    expect(reconstruction, "debug reconstruction mismatch: ReconstructionError (a c10::Error)", reconstruction);
  }

  std::cout << (failures == 0 ? "all C++ executor checks passed" : "C++ executor checks FAILED") << std::endl;
  return failures == 0 ? 0 : 1;
}
