// A C++ (libtorch) training program on the reversible executor: a stack of additive couplings of
// torch::nn MLPs between an input projection and a classifier head, trained with torch::optim::AdamW
// on a generated task (the class is the sign pattern of a random projection). No Python.
//   cmake --build build && ./build/cpp_trainer [steps]       (ctest runs it with 150 steps)
// Exit status 0 when the held-out accuracy ends above 0.8 and the loss fell.
#include <torch/torch.h>

#include <cstdlib>
#include <iostream>

#include "layers.h"
#include "module_fn.h"

using namespace revengine;

int main(int argc, char** argv) {
  const int steps = argc > 1 ? std::atoi(argv[1]) : 300;
  const int64_t in_dim = 16, width = 32, depth = 8, classes = 4, n = 4096, batch = 128;
  torch::manual_seed(0);
  at::Tensor proj = torch::randn({in_dim, 2});
  auto label = [&](const at::Tensor& x) {
    at::Tensor s = (x.matmul(proj) > 0).to(torch::kLong);
    return s.select(1, 0) * 2 + s.select(1, 1);
  };
  at::Tensor x_train = torch::randn({n, in_dim}), x_test = torch::randn({1024, in_dim});
  at::Tensor y_train = label(x_train), y_test = label(x_test);

  torch::nn::Linear embed(in_dim, 2 * width), head(2 * width, classes);
  std::vector<torch::nn::Sequential> blocks;
  std::vector<LayerPtr> layers;
  std::vector<at::Tensor> params;
  for (auto& p : embed->parameters()) params.push_back(p);
  for (auto& p : head->parameters()) params.push_back(p);
  for (int64_t i = 0; i < depth; ++i) {
    for (int k = 0; k < 2; ++k) {
      blocks.push_back(torch::nn::Sequential(torch::nn::Linear(width, 2 * width), torch::nn::GELU(),
                                             torch::nn::Linear(2 * width, width)));
      for (auto& p : blocks.back()->parameters()) params.push_back(p);
    }
    layers.push_back(std::make_shared<AdditiveCoupling>(module_fn(blocks[2 * i], "f"), module_fn(blocks[2 * i + 1], "g")));
  }
  torch::optim::AdamW opt(params, torch::optim::AdamWOptions(3e-3));
  ExecOptions eo;
  auto logits_of = [&](const at::Tensor& x) {
    at::Tensor h = embed->forward(x);
    auto streams = h.chunk(2, 1);
    auto res = reversible_forward(layers, streams[0], streams[1], Ctx{}, eo);  // activations not stored
    return head->forward(torch::cat({res.a, res.b}, 1));
  };
  double first_loss = 0, last_loss = 0;
  for (int step = 0; step < steps; ++step) {
    at::Tensor idx = torch::randint(n, {batch}, torch::kLong);
    at::Tensor loss = torch::nn::functional::cross_entropy(logits_of(x_train.index_select(0, idx)),
                                                           y_train.index_select(0, idx));
    opt.zero_grad();
    loss.backward();  // the executor's C++ node reconstructs each layer's input and runs its vjp
    opt.step();
    if (step == 0) first_loss = loss.item<double>();
    last_loss = loss.item<double>();
    if (step % 50 == 0 || step == steps - 1) std::cout << "step " << step << " loss " << last_loss << std::endl;
  }
  double acc;
  {
    torch::NoGradGuard ng;
    acc = (logits_of(x_test).argmax(1) == y_test).to(torch::kDouble).mean().item<double>();
  }
  std::cout << "held-out accuracy " << acc << " (loss " << first_loss << " -> " << last_loss << ")" << std::endl;
  return (acc > 0.8 && last_loss < first_loss) ? 0 : 1;
}
