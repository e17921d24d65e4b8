// Argument checks shared by the MoE ops' CPU/Meta kernels (moe_ops.cpp) and their CUDA glue
// (cuda/moe_ops_cuda.cpp), so that every device gives the same error messages. The shape and dtype
// checks are symbolic-shape safe (the Meta kernels use them). No pybind11 here.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "ops_checks.h"

namespace revengine {
namespace detail {

// ---------------------------------------------------------------------------------------------
// Argument checks (shapes, dtypes, devices; symbolic-shape safe: also used by the Meta kernels)
// ---------------------------------------------------------------------------------------------
inline void check_same_device(const char* op, const char* xname, const at::Tensor& x, const char* name,
                              const at::Tensor& t) {
  TORCH_CHECK(t.device() == x.device(), "revengine::", op, ": ", name, " is on ", t.device(), " but ", xname,
              " is on ", x.device(), "; they must be on the same device");
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim, const char* shape) {
  TORCH_CHECK(t.dim() == dim, "revengine::", op, ": ", name, " must be ", dim, "-D ", shape, ", got shape ",
              t.sym_sizes());
}

inline void check_slots(const char* op, const at::Tensor& slots, const char* xname, const at::Tensor& x) {
  TORCH_CHECK(slots.defined(), "revengine::", op, ": sorted_slots is an undefined tensor");
  TORCH_CHECK(slots.scalar_type() == at::kLong, "revengine::", op,
              ": sorted_slots must be int64 (as returned by moe_permute), got ", slots.scalar_type());
  check_dim(op, "sorted_slots", slots, 1, "[T*k]");
  check_same_device(op, xname, x, "sorted_slots", slots);
}

inline void check_offsets(const char* op, const at::Tensor& offsets, const char* xname, const at::Tensor& x) {
  TORCH_CHECK(offsets.defined(), "revengine::", op, ": expert_offsets is an undefined tensor");
  TORCH_CHECK(offsets.scalar_type() == at::kLong, "revengine::", op,
              ": expert_offsets must be int64 (as returned by moe_permute), got ", offsets.scalar_type());
  check_dim(op, "expert_offsets", offsets, 1, "[E+1]");
  TORCH_CHECK(offsets.sym_size(0) >= 1, "revengine::", op, ": expert_offsets must have E+1 >= 1 elements");
  check_same_device(op, xname, x, "expert_offsets", offsets);
}

inline void check_permute_args(const at::Tensor& ids, int64_t num_experts) {
  const char* op = "moe_permute";
  TORCH_CHECK(ids.defined(), "revengine::moe_permute: topk_ids is an undefined tensor");
  const auto t = ids.scalar_type();
  TORCH_CHECK(t == at::kLong || t == at::kInt || t == at::kShort,
              "revengine::moe_permute: topk_ids must be int64, int32 or int16, got ", t);
  check_dim(op, "topk_ids", ids, 2, "[T, k]");
  TORCH_CHECK(num_experts >= 1, "revengine::moe_permute: num_experts must be >= 1, got ", num_experts);
}

inline void check_gather_args(const at::Tensor& x, const at::Tensor& slots, int64_t k) {
  const char* op = "moe_gather";
  check_float(op, "x", x);
  check_dim(op, "x", x, 2, "[T, H]");
  TORCH_CHECK(k >= 1, "revengine::moe_gather: k must be >= 1, got ", k);
  check_slots(op, slots, "x", x);
  TORCH_CHECK(slots.sym_size(0) == x.sym_size(0) * k, "revengine::moe_gather: sorted_slots must have T*k = ",
              x.sym_size(0), "*", k, " elements (x is [T, H] = ", x.sym_sizes(), "), got ", slots.sym_size(0));
}

inline void check_gather_backward_args(const at::Tensor& g, const at::Tensor& slots, int64_t k) {
  const char* op = "moe_gather_backward";
  check_float(op, "grad_out", g);
  check_dim(op, "grad_out", g, 2, "[T*k, H]");
  TORCH_CHECK(k >= 1, "revengine::moe_gather_backward: k must be >= 1, got ", k);
  check_slots(op, slots, "grad_out", g);
  TORCH_CHECK(slots.sym_size(0) == g.sym_size(0), "revengine::moe_gather_backward: sorted_slots has ",
              slots.sym_size(0), " elements but grad_out has ", g.sym_size(0), " rows");
  TORCH_CHECK(g.sym_size(0) % k == 0, "revengine::moe_gather_backward: grad_out has ", g.sym_size(0),
              " rows, not a multiple of k = ", k);
}

inline void check_grouped_mm_args(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offsets) {
  const char* op = "moe_grouped_mm";
  check_float(op, "x", x);
  check_dim(op, "x", x, 2, "[N, K]");
  check_float(op, "weight", w);
  check_dim(op, "weight", w, 3, "[E, M, K]");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "revengine::moe_grouped_mm: weight must have x's dtype ",
              x.scalar_type(), ", got ", w.scalar_type());
  check_same_device(op, "x", x, "weight", w);
  TORCH_CHECK(w.sym_size(2) == x.sym_size(1), "revengine::moe_grouped_mm: weight [E, M, K] = ", w.sym_sizes(),
              " does not match x [N, K] = ", x.sym_sizes(), " (the last dims must agree)");
  check_offsets(op, offsets, "x", x);
  TORCH_CHECK(offsets.sym_size(0) == w.sym_size(0) + 1, "revengine::moe_grouped_mm: expert_offsets must have E+1 = ",
              w.sym_size(0) + 1, " elements for weight of shape ", w.sym_sizes(), ", got ", offsets.sym_size(0));
}

inline void check_weight_grad_args(const at::Tensor& g, const at::Tensor& x, const at::Tensor& offsets) {
  const char* op = "moe_grouped_mm_weight_grad";
  check_float(op, "grad_out", g);
  check_dim(op, "grad_out", g, 2, "[N, M]");
  check_float(op, "x", x);
  check_dim(op, "x", x, 2, "[N, K]");
  TORCH_CHECK(g.scalar_type() == x.scalar_type(), "revengine::moe_grouped_mm_weight_grad: grad_out must have x's dtype ",
              x.scalar_type(), ", got ", g.scalar_type());
  check_same_device(op, "x", x, "grad_out", g);
  TORCH_CHECK(g.sym_size(0) == x.sym_size(0), "revengine::moe_grouped_mm_weight_grad: grad_out ", g.sym_sizes(),
              " and x ", x.sym_sizes(), " must have the same number of rows");
  check_offsets(op, offsets, "x", x);
}

inline void check_combine_args(const at::Tensor& y, const at::Tensor& w, const at::Tensor& slots, int64_t num_tokens) {
  const char* op = "moe_scatter_combine";
  check_float(op, "y", y);
  check_dim(op, "y", y, 2, "[T*k, H]");
  check_float(op, "weights", w);
  check_dim(op, "weights", w, 2, "[T, k]");
  check_same_device(op, "y", y, "weights", w);
  check_slots(op, slots, "y", y);
  TORCH_CHECK(num_tokens >= 0, "revengine::moe_scatter_combine: num_tokens must be >= 0, got ", num_tokens);
  TORCH_CHECK(w.sym_size(0) == num_tokens, "revengine::moe_scatter_combine: weights must be [T, k] with T = num_tokens = ",
              num_tokens, ", got shape ", w.sym_sizes());
  TORCH_CHECK(y.sym_size(0) == w.sym_size(0) * w.sym_size(1), "revengine::moe_scatter_combine: y must have T*k = ",
              w.sym_size(0) * w.sym_size(1), " rows (weights is [T, k] = ", w.sym_sizes(), "), got y of shape ",
              y.sym_sizes());
  TORCH_CHECK(slots.sym_size(0) == y.sym_size(0), "revengine::moe_scatter_combine: sorted_slots has ",
              slots.sym_size(0), " elements but y has ", y.sym_size(0), " rows");
}

inline void check_combine_backward_args(const at::Tensor& g, const at::Tensor& y, const at::Tensor& w,
                                        const at::Tensor& slots) {
  const char* op = "moe_scatter_combine_backward";
  check_float(op, "grad_out", g);
  check_dim(op, "grad_out", g, 2, "[T, H]");
  check_float(op, "y", y);
  check_dim(op, "y", y, 2, "[T*k, H]");
  TORCH_CHECK(g.scalar_type() == y.scalar_type(), "revengine::moe_scatter_combine_backward: grad_out must have y's dtype ",
              y.scalar_type(), ", got ", g.scalar_type());
  check_same_device(op, "y", y, "grad_out", g);
  check_float(op, "weights", w);
  check_dim(op, "weights", w, 2, "[T, k]");
  check_same_device(op, "y", y, "weights", w);
  check_slots(op, slots, "y", y);
  TORCH_CHECK(g.sym_size(0) == w.sym_size(0) && g.sym_size(1) == y.sym_size(1),
              "revengine::moe_scatter_combine_backward: grad_out must be [T, H] = [", w.sym_size(0), ", ",
              y.sym_size(1), "], got ", g.sym_sizes());
  TORCH_CHECK(y.sym_size(0) == w.sym_size(0) * w.sym_size(1), "revengine::moe_scatter_combine_backward: y must have T*k = ",
              w.sym_size(0) * w.sym_size(1), " rows, got y of shape ", y.sym_sizes());
  TORCH_CHECK(slots.sym_size(0) == y.sym_size(0), "revengine::moe_scatter_combine_backward: sorted_slots has ",
              slots.sym_size(0), " elements but y has ", y.sym_size(0), " rows");
}

// ---------------------------------------------------------------------------------------------
// Value checks and helpers shared by the devices
// ---------------------------------------------------------------------------------------------

// expert_offsets may be on any device: CUDA offsets are copied to the host once (a blocking copy on
// the current stream, so it sees the kernels queued before it).
// Offsets as a host vector after checking offsets[0] = 0, non-decreasing, offsets[E] = n_rows.
inline std::vector<int64_t> checked_offsets(const char* op, const at::Tensor& offsets, int64_t n_rows) {
  const at::Tensor c = offsets.to(at::kCPU).contiguous();  // CUDA offsets: one blocking copy
  const int64_t* p = c.data_ptr<int64_t>();
  std::vector<int64_t> v(p, p + c.numel());
  const int64_t E = static_cast<int64_t>(v.size()) - 1;
  TORCH_CHECK(v[0] == 0, "revengine::", op, ": expert_offsets[0] must be 0, got ", v[0]);
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(v[e + 1] >= v[e], "revengine::", op, ": expert_offsets must be non-decreasing, got offsets[", e,
                "] = ", v[e], " > offsets[", e + 1, "] = ", v[e + 1]);
  }
  TORCH_CHECK(v[E] == n_rows, "revengine::", op, ": expert_offsets[E] = ", v[E],
              " must equal the number of rows of x, ", n_rows);
  return v;
}

// Routing weights in the opmath type of y's dtype, contiguous [T*k].
inline at::Tensor opmath_weights(const at::Tensor& w, at::ScalarType ytype) {
  return w.to(ytype == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

}  // namespace detail
}  // namespace revengine
