// Adapts C++ torch::nn modules to the executor's Fn interface (header-only: only C++ programs
// that build stacks from torch::nn modules include it, and pay for <torch/torch.h>).
#pragma once
#include <torch/torch.h>

#include <functional>
#include <utility>

#include "executor.h"

namespace revengine {

// A stream function from any torch::nn module with forward(Tensor) -> Tensor. The context is
// not passed (C++ modules take one argument); use a custom Fn for context-dependent blocks.
class ModuleFn : public Fn {
 public:
  // Any module holder (Linear, Sequential, your own) whose forward takes and returns a Tensor.
  template <typename ModuleHolder>
  explicit ModuleFn(ModuleHolder module, std::string label = "module")
      : module_(module.ptr()),
        forward_([module](const at::Tensor& x) mutable { return module->forward(x); }),
        label_(std::move(label)) {}
  at::Tensor call(const at::Tensor& x, const Ctx& /*ctx*/) override { return forward_(x); }
  std::vector<at::Tensor> parameters() override { return module_->parameters(); }
  std::string name() const override { return label_; }

 private:
  std::shared_ptr<torch::nn::Module> module_;
  std::function<at::Tensor(const at::Tensor&)> forward_;
  std::string label_;
};

template <typename ModuleHolder>
FnPtr module_fn(ModuleHolder module, std::string label = "module") {
  return std::make_shared<ModuleFn>(std::move(module), std::move(label));
}

}  // namespace revengine
