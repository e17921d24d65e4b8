// MoE routing kernels of revengine, registered as torch ops (namespace "revengine"), CPU + Meta.
// These wrappers go through the dispatcher (so autograd and every backend are reachable from one
// call site), like ops.h.
//
// Layout: T tokens, each routed to k experts ("slots" s = t*k + j, T*k of them), E experts.
//   sorted_slots  int64 [T*k]   the slots ordered by expert, ascending slot within an expert
//   expert_offsets int64 [E+1]  rows of expert e in sorted order: [offsets[e], offsets[e+1])
#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace revengine {
namespace ops {

// topk_ids int16/int32/int64 [T, k] with values in [0, num_experts) -> (sorted_slots, expert_offsets).
// Stable counting sort, O(T*k). Not differentiable (integer outputs).
std::tuple<at::Tensor, at::Tensor> moe_permute(const at::Tensor& topk_ids, int64_t num_experts);

// x [T, H] -> out [T*k, H], out[i] = x[sorted_slots[i] / k]. Differentiable in x.
at::Tensor moe_gather(const at::Tensor& x, const at::Tensor& sorted_slots, int64_t k);

// Backward of moe_gather: grad_out [T*k, H] -> dx [T, H], dx[t] = sum_j grad_out[pos(t*k + j)]
// (pos = inverse of sorted_slots; fixed summation order j = 0..k-1). Differentiable.
at::Tensor moe_gather_backward(const at::Tensor& grad_out, const at::Tensor& sorted_slots, int64_t num_tokens);

// x [N, K] (rows grouped by expert per expert_offsets), weight [E, M, K] -> out [N, M] with
// out[rows of e] = x[rows of e] @ weight[e]^T. Differentiable in x and weight.
at::Tensor moe_grouped_mm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& expert_offsets);

// dweight [E, M, K] with dweight[e] = grad_out[rows of e]^T @ x[rows of e] (zero for an expert
// with no rows). Differentiable.
at::Tensor moe_grouped_mm_weight_grad(const at::Tensor& grad_out, const at::Tensor& x,
                                      const at::Tensor& expert_offsets);

// The kernels of moe_grouped_mm / moe_grouped_mm_weight_grad on any device: one at::mm_out per
// expert on narrowed slices (the offsets are read on the host once).
at::Tensor grouped_mm_per_expert(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& expert_offsets);
at::Tensor grouped_mm_weight_grad_per_expert(const at::Tensor& grad_out, const at::Tensor& x,
                                             const at::Tensor& expert_offsets);

// y [T*k, H] (sorted order), weights [T, k] -> out [T, H], out[t] = sum_j weights[t, j] * y[pos(t*k + j)].
// Differentiable in y and weights.
at::Tensor moe_scatter_combine(const at::Tensor& y, const at::Tensor& weights, const at::Tensor& sorted_slots,
                               int64_t num_tokens);

// Backward of moe_scatter_combine: (grad_y [T*k, H], grad_weights [T, k]) with
// grad_y[i] = weights.flatten()[s_i] * grad_out[s_i / k], grad_weights[t, j] = dot(grad_out[t], y[pos(t*k+j)]).
// Differentiable.
std::tuple<at::Tensor, at::Tensor> moe_scatter_combine_backward(const at::Tensor& grad_out, const at::Tensor& y,
                                                                const at::Tensor& weights,
                                                                const at::Tensor& sorted_slots);

}  // namespace ops
}  // namespace revengine
