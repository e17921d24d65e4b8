// MoE routing kernels of revengine (see moe_ops.h): op schemas, CPU and Meta kernels, autograd.
//
//   moe_permute          topk_ids [T, k] -> sorted_slots [T*k], expert_offsets [E+1]
//                        (stable counting sort: per-chunk histograms in parallel, one prefix sum,
//                        per-chunk scatter in parallel; the result does not depend on threads)
//   moe_gather           x [T, H] -> [T*k, H]                 (row copies, parallel over rows)
//   moe_grouped_mm       x [N, K], weight [E, M, K] -> [N, M] (one at::mm_out per expert, written
//                        straight into its rows of the output; at::mm is multithreaded itself)
//   moe_scatter_combine  y [T*k, H], weights [T, k] -> [T, H] (parallel over tokens through the
//                        inverse permutation: no atomics, fixed summation order j = 0..k-1)
// and their backward ops (moe_gather_backward, moe_grouped_mm_weight_grad,
// moe_scatter_combine_backward), which are differentiable too (every backward is written with
// these ops), so double backward works.
//
// Floating dtypes: float32, float64, bfloat16, float16; sums in the opmath type (float for
// bfloat16/float16). Index tensors (sorted_slots, expert_offsets) are int64; topk_ids may be
// int16, int32 or int64. Values of index tensors are checked on CPU (a clear error, never an
// out-of-bounds read); the Meta kernels check shapes and dtypes only.
//
// The file is also compiled into a plain C++ shared library: no pybind11 here.
#include "moe_ops.h"
#include "moe_checks.h"
#include "ops_checks.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace revengine {
namespace {

using detail::check_combine_args;
using detail::check_combine_backward_args;
using detail::check_float;
using detail::check_gather_args;
using detail::check_gather_backward_args;
using detail::check_grouped_mm_args;
using detail::check_permute_args;
using detail::check_weight_grad_args;
using detail::checked_offsets;
using detail::opmath_weights;

constexpr int64_t kGrain = 32768;  // elements per parallel task, as ops.cpp

// Rows per parallel task for rows of `width` elements.
inline int64_t row_grain(int64_t width) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(width, 1)); }

// ---------------------------------------------------------------------------------------------
// Value checks (CPU)
// ---------------------------------------------------------------------------------------------

// pos[s] = i where sorted_slots[i] = s; an error unless sorted_slots is a permutation of [0, n).
std::vector<int64_t> inverse_permutation(const char* op, const at::Tensor& slots_c) {
  const int64_t n = slots_c.numel();
  const int64_t* s = slots_c.data_ptr<int64_t>();
  std::vector<int64_t> pos(static_cast<size_t>(n), -1);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = s[i];
    TORCH_CHECK(v >= 0 && v < n, "revengine::", op, ": sorted_slots[", i, "] = ", v, " is out of range [0, ", n,
                "); sorted_slots must be a permutation of the T*k slots (as returned by moe_permute)");
    TORCH_CHECK(pos[v] < 0, "revengine::", op, ": slot ", v, " appears twice in sorted_slots (at ", pos[v], " and ",
                i, "); sorted_slots must be a permutation of the T*k slots (as returned by moe_permute)");
    pos[v] = i;
  }
  return pos;
}

// ---------------------------------------------------------------------------------------------
// CPU kernels
// ---------------------------------------------------------------------------------------------
template <typename idx_t>
void permute_impl(const idx_t* ids, int64_t n, int64_t k, int64_t E, int64_t* slots, int64_t* offsets) {
  // Fixed chunking (independent of the thread count): histograms per chunk, prefix sums in
  // (expert, chunk) order, then each chunk scatters its slots in ascending order: stable.
  constexpr int64_t kChunk = 8192;
  const int64_t nchunks = std::max<int64_t>(1, (n + kChunk - 1) / kChunk);
  std::vector<int64_t> counts(static_cast<size_t>(nchunks * E), 0);
  std::vector<int64_t> first_bad(static_cast<size_t>(nchunks), -1);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* cnt = counts.data() + c * E;
      const int64_t end = std::min(n, (c + 1) * kChunk);
      for (int64_t i = c * kChunk; i < end; ++i) {
        const int64_t e = static_cast<int64_t>(ids[i]);
        if (e < 0 || e >= E) {
          first_bad[c] = i;
          break;
        }
        ++cnt[e];
      }
    }
  });
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t i = first_bad[c];
    TORCH_CHECK(i < 0, "revengine::moe_permute: topk_ids must be in [0, num_experts = ", E, "), got ",
                static_cast<int64_t>(ids[i]), " at token ", i / k, ", choice ", i % k, " (flat index ", i, ")");
  }
  // counts[c][e] becomes the first output position of chunk c's slots of expert e.
  int64_t running = 0;
  offsets[0] = 0;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t cnt = counts[c * E + e];
      counts[c * E + e] = running;
      running += cnt;
    }
    offsets[e + 1] = running;
  }
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* next = counts.data() + c * E;
      const int64_t end = std::min(n, (c + 1) * kChunk);
      for (int64_t i = c * kChunk; i < end; ++i) slots[next[static_cast<int64_t>(ids[i])]++] = i;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> moe_permute_cpu(const at::Tensor& topk_ids, int64_t num_experts) {
  check_permute_args(topk_ids, num_experts);
  const at::Tensor ids = topk_ids.contiguous();
  const int64_t n = ids.numel();
  const auto lopts = ids.options().dtype(at::kLong);
  at::Tensor slots = at::empty({n}, lopts);
  at::Tensor offsets = at::empty({num_experts + 1}, lopts);
  int64_t* sp = slots.data_ptr<int64_t>();
  int64_t* op = offsets.data_ptr<int64_t>();
  const int64_t k = ids.size(1);
  switch (ids.scalar_type()) {
    case at::kLong: permute_impl(ids.const_data_ptr<int64_t>(), n, k, num_experts, sp, op); break;
    case at::kInt: permute_impl(ids.const_data_ptr<int32_t>(), n, k, num_experts, sp, op); break;
    default: permute_impl(ids.const_data_ptr<int16_t>(), n, k, num_experts, sp, op); break;
  }
  return {slots, offsets};
}

at::Tensor moe_gather_cpu(const at::Tensor& x, const at::Tensor& sorted_slots, int64_t k) {
  check_gather_args(x, sorted_slots, k);
  const at::Tensor xc = x.contiguous();
  const at::Tensor sc = sorted_slots.contiguous();
  const int64_t N = sc.numel(), H = xc.size(1);
  const int64_t* s = sc.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(s[i] >= 0 && s[i] < N, "revengine::moe_gather: sorted_slots[", i, "] = ", s[i],
                " is out of range [0, T*k = ", N, ")");
  }
  at::Tensor out = at::empty({N, H}, xc.options());
  if (N == 0 || H == 0) return out;
  const size_t row_bytes = static_cast<size_t>(H) * xc.element_size();
  const char* src = static_cast<const char*>(xc.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, N, row_grain(H), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) std::memcpy(dst + i * row_bytes, src + (s[i] / k) * row_bytes, row_bytes);
  });
  return out;
}

at::Tensor moe_gather_backward_cpu(const at::Tensor& grad_out, const at::Tensor& sorted_slots, int64_t k) {
  check_gather_backward_args(grad_out, sorted_slots, k);
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor sc = sorted_slots.contiguous();
  const int64_t N = g.size(0), H = g.size(1), T = N / k;
  const std::vector<int64_t> pos = inverse_permutation("moe_gather_backward", sc);
  at::Tensor dx = at::empty({T, H}, g.options());
  if (T == 0 || H == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "moe_gather_backward", [&] {
    using opmath = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, T, row_grain(H * k), [&](int64_t t0, int64_t t1) {
      std::vector<opmath> acc(static_cast<size_t>(H));
      for (int64_t t = t0; t < t1; ++t) {
        std::fill(acc.begin(), acc.end(), opmath(0));
        for (int64_t j = 0; j < k; ++j) {
          const scalar_t* row = gp + pos[t * k + j] * H;
          for (int64_t h = 0; h < H; ++h) acc[h] += static_cast<opmath>(row[h]);
        }
        scalar_t* o = dp + t * H;
        for (int64_t h = 0; h < H; ++h) o[h] = static_cast<scalar_t>(acc[h]);
      }
    });
  });
  return dx;
}

}  // namespace

namespace ops {

at::Tensor grouped_mm_per_expert(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& expert_offsets) {
  check_grouped_mm_args(x, weight, expert_offsets);
  const int64_t N = x.size(0), M = weight.size(1), E = weight.size(0);
  const std::vector<int64_t> off = checked_offsets("moe_grouped_mm", expert_offsets, N);
  at::Tensor out = at::empty({N, M}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0 || M == 0) return out;
  if (x.size(1) == 0) return out.zero_();
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = off[e + 1] - off[e];
    if (n == 0) continue;
    at::Tensor o = out.narrow(0, off[e], n);  // contiguous rows of out: mm writes in place
    at::mm_out(o, x.narrow(0, off[e], n), weight.select(0, e).t());
  }
  return out;
}

at::Tensor grouped_mm_weight_grad_per_expert(const at::Tensor& grad_out, const at::Tensor& x,
                                            const at::Tensor& expert_offsets) {
  check_weight_grad_args(grad_out, x, expert_offsets);
  const int64_t N = x.size(0), K = x.size(1), M = grad_out.size(1), E = expert_offsets.size(0) - 1;
  const std::vector<int64_t> off = checked_offsets("moe_grouped_mm_weight_grad", expert_offsets, N);
  at::Tensor dw = at::empty({E, M, K}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (dw.numel() == 0) return dw;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = off[e + 1] - off[e];
    at::Tensor o = dw.select(0, e);
    if (n == 0) {
      o.zero_();
      continue;
    }
    at::mm_out(o, grad_out.narrow(0, off[e], n).t(), x.narrow(0, off[e], n));
  }
  return dw;
}

}  // namespace ops

namespace {

at::Tensor moe_scatter_combine_cpu(const at::Tensor& y, const at::Tensor& weights, const at::Tensor& sorted_slots,
                                   int64_t num_tokens) {
  check_combine_args(y, weights, sorted_slots, num_tokens);
  const at::Tensor yc = y.contiguous();
  const at::Tensor wc = opmath_weights(weights, y.scalar_type());
  const at::Tensor sc = sorted_slots.contiguous();
  const int64_t T = num_tokens, k = weights.size(1), H = yc.size(1);
  const std::vector<int64_t> pos = inverse_permutation("moe_scatter_combine", sc);
  at::Tensor out = at::empty({T, H}, yc.options());
  if (T == 0 || H == 0) return out;
  if (k == 0) return out.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, yc.scalar_type(), "moe_scatter_combine", [&] {
    using opmath = at::opmath_type<scalar_t>;
    const scalar_t* yp = yc.const_data_ptr<scalar_t>();
    const opmath* wp = wc.const_data_ptr<opmath>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, row_grain(H * k), [&](int64_t t0, int64_t t1) {
      std::vector<opmath> acc(static_cast<size_t>(H));
      for (int64_t t = t0; t < t1; ++t) {
        std::fill(acc.begin(), acc.end(), opmath(0));
        for (int64_t j = 0; j < k; ++j) {
          const opmath wj = wp[t * k + j];
          const scalar_t* row = yp + pos[t * k + j] * H;
          for (int64_t h = 0; h < H; ++h) acc[h] += wj * static_cast<opmath>(row[h]);
        }
        scalar_t* o = op + t * H;
        for (int64_t h = 0; h < H; ++h) o[h] = static_cast<scalar_t>(acc[h]);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> moe_scatter_combine_backward_cpu(const at::Tensor& grad_out, const at::Tensor& y,
                                                                    const at::Tensor& weights,
                                                                    const at::Tensor& sorted_slots) {
  check_combine_backward_args(grad_out, y, weights, sorted_slots);
  const at::Tensor gc = grad_out.contiguous();
  const at::Tensor yc = y.contiguous();
  const at::Tensor wc = opmath_weights(weights, y.scalar_type());
  const at::Tensor sc = sorted_slots.contiguous();
  const int64_t T = weights.size(0), k = weights.size(1), H = yc.size(1);
  const std::vector<int64_t> pos = inverse_permutation("moe_scatter_combine_backward", sc);
  at::Tensor dy = at::empty({T * k, H}, yc.options());
  at::Tensor dw = at::empty({T, k}, wc.options());
  if (T * k > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, yc.scalar_type(), "moe_scatter_combine_backward", [&] {
      using opmath = at::opmath_type<scalar_t>;
      const scalar_t* gp = gc.const_data_ptr<scalar_t>();
      const scalar_t* yp = yc.const_data_ptr<scalar_t>();
      const opmath* wp = wc.const_data_ptr<opmath>();
      scalar_t* dyp = dy.data_ptr<scalar_t>();
      opmath* dwp = dw.data_ptr<opmath>();
      at::parallel_for(0, T, row_grain(H * k), [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const scalar_t* g = gp + t * H;
          for (int64_t j = 0; j < k; ++j) {
            const int64_t i = pos[t * k + j];
            const opmath wj = wp[t * k + j];
            const scalar_t* yr = yp + i * H;
            scalar_t* d = dyp + i * H;
            opmath dot = 0;
            for (int64_t h = 0; h < H; ++h) {
              const opmath gh = static_cast<opmath>(g[h]);
              d[h] = static_cast<scalar_t>(wj * gh);
              dot += gh * static_cast<opmath>(yr[h]);
            }
            dwp[t * k + j] = dot;
          }
        }
      });
    });
  }
  return {dy, dw.to(weights.scalar_type())};
}

// ---------------------------------------------------------------------------------------------
// Meta kernels (also used by FakeTensor / torch.compile; symbolic-shape safe)
// ---------------------------------------------------------------------------------------------
at::TensorOptions contiguous_like(const at::Tensor& t) {
  return t.options().memory_format(at::MemoryFormat::Contiguous);
}

std::tuple<at::Tensor, at::Tensor> moe_permute_meta(const at::Tensor& topk_ids, int64_t num_experts) {
  check_permute_args(topk_ids, num_experts);
  const auto lopts = topk_ids.options().dtype(at::kLong);
  return {at::empty_symint({topk_ids.sym_numel()}, lopts), at::empty({num_experts + 1}, lopts)};
}

at::Tensor moe_gather_meta(const at::Tensor& x, const at::Tensor& sorted_slots, int64_t k) {
  check_gather_args(x, sorted_slots, k);
  return at::empty_symint({sorted_slots.sym_size(0), x.sym_size(1)}, contiguous_like(x));
}

at::Tensor moe_gather_backward_meta(const at::Tensor& grad_out, const at::Tensor& sorted_slots, int64_t k) {
  check_gather_backward_args(grad_out, sorted_slots, k);
  return at::empty_symint({grad_out.sym_size(0) / k, grad_out.sym_size(1)}, contiguous_like(grad_out));
}

at::Tensor moe_grouped_mm_meta(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& expert_offsets) {
  check_grouped_mm_args(x, weight, expert_offsets);
  return at::empty_symint({x.sym_size(0), weight.sym_size(1)}, contiguous_like(x));
}

at::Tensor moe_grouped_mm_weight_grad_meta(const at::Tensor& grad_out, const at::Tensor& x,
                                           const at::Tensor& expert_offsets) {
  check_weight_grad_args(grad_out, x, expert_offsets);
  return at::empty_symint({expert_offsets.sym_size(0) - 1, grad_out.sym_size(1), x.sym_size(1)}, contiguous_like(x));
}

at::Tensor moe_scatter_combine_meta(const at::Tensor& y, const at::Tensor& weights, const at::Tensor& sorted_slots,
                                    int64_t num_tokens) {
  check_combine_args(y, weights, sorted_slots, num_tokens);
  return at::empty_symint({weights.sym_size(0), y.sym_size(1)}, contiguous_like(y));
}

std::tuple<at::Tensor, at::Tensor> moe_scatter_combine_backward_meta(const at::Tensor& grad_out, const at::Tensor& y,
                                                                     const at::Tensor& weights,
                                                                     const at::Tensor& sorted_slots) {
  check_combine_backward_args(grad_out, y, weights, sorted_slots);
  return {at::empty_symint(y.sym_sizes(), contiguous_like(y)),
          at::empty_symint(weights.sym_sizes(), contiguous_like(weights))};
}

// ---------------------------------------------------------------------------------------------
// Autograd. Every backward is written with the ops themselves, so it is differentiable again.
// ---------------------------------------------------------------------------------------------
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor add_defined(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined()) return b;
  if (!b.defined()) return a;
  return a + b;
}

struct GatherFn : public torch::autograd::Function<GatherFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& slots, int64_t k) {
    ctx->saved_data["k"] = k;
    ctx->save_for_backward({slots});
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::moe_gather(x, slots, k);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& g = grads[0];
    if (!g.defined() || !ctx->needs_input_grad(0)) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    return {ops::moe_gather_backward(g, saved[0], ctx->saved_data["k"].toInt()), at::Tensor(), at::Tensor()};
  }
};

struct GatherBackwardFn : public torch::autograd::Function<GatherBackwardFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& g, const at::Tensor& slots, int64_t k) {
    ctx->saved_data["k"] = k;
    ctx->save_for_backward({slots});
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::moe_gather_backward(g, slots, k);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& gg = grads[0];
    if (!gg.defined() || !ctx->needs_input_grad(0)) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    return {ops::moe_gather(gg, saved[0], ctx->saved_data["k"].toInt()), at::Tensor(), at::Tensor()};
  }
};

struct GroupedMmFn : public torch::autograd::Function<GroupedMmFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const at::Tensor& off) {
    ctx->save_for_backward({x, w, off});
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::moe_grouped_mm(x, w, off);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& g = grads[0];
    if (!g.defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &off = saved[2];
    // dx_e = g_e @ w[e] = g_e @ (w^T)[e]^T; dw[e] = g_e^T @ x_e
    at::Tensor dx = ctx->needs_input_grad(0) ? ops::moe_grouped_mm(g, w.transpose(1, 2), off) : at::Tensor();
    at::Tensor dw = ctx->needs_input_grad(1) ? ops::moe_grouped_mm_weight_grad(g, x, off) : at::Tensor();
    return {dx, dw, at::Tensor()};
  }
};

struct GroupedMmWeightGradFn : public torch::autograd::Function<GroupedMmWeightGradFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& g, const at::Tensor& x, const at::Tensor& off) {
    ctx->save_for_backward({g, x, off});
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::moe_grouped_mm_weight_grad(g, x, off);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& gw = grads[0];  // [E, M, K]
    if (!gw.defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &g = saved[0], &x = saved[1], &off = saved[2];
    // out[e] = g_e^T x_e: d g_e = x_e @ gw[e]^T, d x_e = g_e @ gw[e]
    at::Tensor dg = ctx->needs_input_grad(0) ? ops::moe_grouped_mm(x, gw, off) : at::Tensor();
    at::Tensor dx = ctx->needs_input_grad(1) ? ops::moe_grouped_mm(g, gw.transpose(1, 2), off) : at::Tensor();
    return {dg, dx, at::Tensor()};
  }
};

struct ScatterCombineFn : public torch::autograd::Function<ScatterCombineFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& y, const at::Tensor& w, const at::Tensor& slots,
                            int64_t num_tokens) {
    ctx->save_for_backward({y, w, slots});
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::moe_scatter_combine(y, w, slots, num_tokens);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& g = grads[0];
    if (!g.defined() || !(ctx->needs_input_grad(0) || ctx->needs_input_grad(1))) {
      return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    const auto saved = ctx->get_saved_variables();
    auto r = ops::moe_scatter_combine_backward(g, saved[0], saved[1], saved[2]);
    return {ctx->needs_input_grad(0) ? std::get<0>(r) : at::Tensor(),
            ctx->needs_input_grad(1) ? std::get<1>(r) : at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct ScatterCombineBackwardFn : public torch::autograd::Function<ScatterCombineBackwardFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& g, const at::Tensor& y, const at::Tensor& w,
                               const at::Tensor& slots) {
    ctx->save_for_backward({g, y, w, slots});
    at::AutoDispatchBelowADInplaceOrView guard;
    auto r = ops::moe_scatter_combine_backward(g, y, w, slots);
    return {std::get<0>(r), std::get<1>(r)};
  }
  // forward: dy[i] = w[s_i] * g[s_i / k], dw[t, j] = <g[t], y[pos(t, j)]>
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor &ggy = grads[0], &ggw = grads[1];
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &g = saved[0], &y = saved[1], &w = saved[2], &slots = saved[3];
    const int64_t T = w.sym_size(0).guard_int(__FILE__, __LINE__);
    at::Tensor dg, dy, dw;
    if (ctx->needs_input_grad(0)) {  // d g[t] = sum_j w[t,j] ggy[pos] + sum_j ggw[t,j] y[pos]
      if (ggy.defined()) dg = ops::moe_scatter_combine(ggy.to(y.scalar_type()), w, slots, T);
      if (ggw.defined()) dg = add_defined(dg, ops::moe_scatter_combine(y, ggw, slots, T));
    }
    if (ctx->needs_input_grad(1) && ggw.defined()) {  // d y[i] = ggw[s_i] * g[s_i / k]
      dy = std::get<0>(ops::moe_scatter_combine_backward(g, y, ggw, slots));
    }
    if (ctx->needs_input_grad(2) && ggy.defined()) {  // d w[t, j] = <g[t], ggy[pos(t, j)]>
      dw = std::get<1>(ops::moe_scatter_combine_backward(g, ggy.to(y.scalar_type()), w, slots));
    }
    return {dg, dy, dw, at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> moe_permute_autograd(const at::Tensor& topk_ids, int64_t num_experts) {
  // Integer in, integer out: nothing to differentiate.
  at::AutoDispatchBelowADInplaceOrView guard;
  return ops::moe_permute(topk_ids, num_experts);
}

at::Tensor moe_gather_autograd(const at::Tensor& x, const at::Tensor& slots, int64_t k) {
  return GatherFn::apply(x, slots, k);
}

at::Tensor moe_gather_backward_autograd(const at::Tensor& g, const at::Tensor& slots, int64_t k) {
  return GatherBackwardFn::apply(g, slots, k);
}

at::Tensor moe_grouped_mm_autograd(const at::Tensor& x, const at::Tensor& w, const at::Tensor& off) {
  return GroupedMmFn::apply(x, w, off);
}

at::Tensor moe_grouped_mm_weight_grad_autograd(const at::Tensor& g, const at::Tensor& x, const at::Tensor& off) {
  return GroupedMmWeightGradFn::apply(g, x, off);
}

at::Tensor moe_scatter_combine_autograd(const at::Tensor& y, const at::Tensor& w, const at::Tensor& slots,
                                        int64_t num_tokens) {
  return ScatterCombineFn::apply(y, w, slots, num_tokens);
}

std::tuple<at::Tensor, at::Tensor> moe_scatter_combine_backward_autograd(const at::Tensor& g, const at::Tensor& y,
                                                                         const at::Tensor& w, const at::Tensor& slots) {
  auto r = ScatterCombineBackwardFn::apply(g, y, w, slots);
  return {r[0], r[1]};
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Dispatcher-calling wrappers (moe_ops.h)
// ---------------------------------------------------------------------------------------------
namespace ops {

// Variadic: signatures returning std::tuple<...> contain commas.
#define REVENGINE_OP_HANDLE(NAME, ...)                                                          \
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("revengine::" NAME, "") \
                             .typed<__VA_ARGS__>()

std::tuple<at::Tensor, at::Tensor> moe_permute(const at::Tensor& topk_ids, int64_t num_experts) {
  REVENGINE_OP_HANDLE("moe_permute", std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t));
  return op.call(topk_ids, num_experts);
}

at::Tensor moe_gather(const at::Tensor& x, const at::Tensor& sorted_slots, int64_t k) {
  REVENGINE_OP_HANDLE("moe_gather", at::Tensor(const at::Tensor&, const at::Tensor&, int64_t));
  return op.call(x, sorted_slots, k);
}

at::Tensor moe_gather_backward(const at::Tensor& grad_out, const at::Tensor& sorted_slots, int64_t k) {
  REVENGINE_OP_HANDLE("moe_gather_backward", at::Tensor(const at::Tensor&, const at::Tensor&, int64_t));
  return op.call(grad_out, sorted_slots, k);
}

at::Tensor moe_grouped_mm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& expert_offsets) {
  REVENGINE_OP_HANDLE("moe_grouped_mm", at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&));
  return op.call(x, weight, expert_offsets);
}

at::Tensor moe_grouped_mm_weight_grad(const at::Tensor& grad_out, const at::Tensor& x,
                                      const at::Tensor& expert_offsets) {
  REVENGINE_OP_HANDLE("moe_grouped_mm_weight_grad",
                      at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&));
  return op.call(grad_out, x, expert_offsets);
}

at::Tensor moe_scatter_combine(const at::Tensor& y, const at::Tensor& weights, const at::Tensor& sorted_slots,
                               int64_t num_tokens) {
  REVENGINE_OP_HANDLE("moe_scatter_combine",
                      at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t));
  return op.call(y, weights, sorted_slots, num_tokens);
}

std::tuple<at::Tensor, at::Tensor> moe_scatter_combine_backward(const at::Tensor& grad_out, const at::Tensor& y,
                                                                const at::Tensor& weights,
                                                                const at::Tensor& sorted_slots) {
  REVENGINE_OP_HANDLE("moe_scatter_combine_backward",
                      std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                         const at::Tensor&));
  return op.call(grad_out, y, weights, sorted_slots);
}

#undef REVENGINE_OP_HANDLE

}  // namespace ops
}  // namespace revengine

// ---------------------------------------------------------------------------------------------
// Registration (ops.cpp owns TORCH_LIBRARY(revengine); this file adds a fragment).
// ---------------------------------------------------------------------------------------------
TORCH_LIBRARY_FRAGMENT(revengine, m) {
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
  m.def("moe_permute(Tensor topk_ids, int num_experts) -> (Tensor sorted_slots, Tensor expert_offsets)", tags);
  m.def("moe_gather(Tensor x, Tensor sorted_slots, int k) -> Tensor", tags);
  m.def("moe_gather_backward(Tensor grad_out, Tensor sorted_slots, int k) -> Tensor", tags);
  m.def("moe_grouped_mm(Tensor x, Tensor weight, Tensor expert_offsets) -> Tensor", tags);
  m.def("moe_grouped_mm_weight_grad(Tensor grad_out, Tensor x, Tensor expert_offsets) -> Tensor", tags);
  m.def("moe_scatter_combine(Tensor y, Tensor weights, Tensor sorted_slots, int num_tokens) -> Tensor", tags);
  m.def("moe_scatter_combine_backward(Tensor grad_out, Tensor y, Tensor weights, Tensor sorted_slots) -> "
        "(Tensor grad_y, Tensor grad_weights)",
        tags);
}

TORCH_LIBRARY_IMPL(revengine, CPU, m) {
  using namespace revengine;
  m.impl("moe_permute", TORCH_FN(moe_permute_cpu));
  m.impl("moe_gather", TORCH_FN(moe_gather_cpu));
  m.impl("moe_gather_backward", TORCH_FN(moe_gather_backward_cpu));
  m.impl("moe_grouped_mm", TORCH_FN(ops::grouped_mm_per_expert));
  m.impl("moe_grouped_mm_weight_grad", TORCH_FN(ops::grouped_mm_weight_grad_per_expert));
  m.impl("moe_scatter_combine", TORCH_FN(moe_scatter_combine_cpu));
  m.impl("moe_scatter_combine_backward", TORCH_FN(moe_scatter_combine_backward_cpu));
}

TORCH_LIBRARY_IMPL(revengine, Meta, m) {
  using namespace revengine;
  m.impl("moe_permute", TORCH_FN(moe_permute_meta));
  m.impl("moe_gather", TORCH_FN(moe_gather_meta));
  m.impl("moe_gather_backward", TORCH_FN(moe_gather_backward_meta));
  m.impl("moe_grouped_mm", TORCH_FN(moe_grouped_mm_meta));
  m.impl("moe_grouped_mm_weight_grad", TORCH_FN(moe_grouped_mm_weight_grad_meta));
  m.impl("moe_scatter_combine", TORCH_FN(moe_scatter_combine_meta));
  m.impl("moe_scatter_combine_backward", TORCH_FN(moe_scatter_combine_backward_meta));
}

TORCH_LIBRARY_IMPL(revengine, Autograd, m) {
  using namespace revengine;
  m.impl("moe_permute", TORCH_FN(moe_permute_autograd));
  m.impl("moe_gather", TORCH_FN(moe_gather_autograd));
  m.impl("moe_gather_backward", TORCH_FN(moe_gather_backward_autograd));
  m.impl("moe_grouped_mm", TORCH_FN(moe_grouped_mm_autograd));
  m.impl("moe_grouped_mm_weight_grad", TORCH_FN(moe_grouped_mm_weight_grad_autograd));
  m.impl("moe_scatter_combine", TORCH_FN(moe_scatter_combine_autograd));
  m.impl("moe_scatter_combine_backward", TORCH_FN(moe_scatter_combine_backward_autograd));
}
