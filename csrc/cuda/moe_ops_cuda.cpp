// CUDA kernels of the MoE routing ops (schemas, autograd and the CPU/Meta kernels in ../moe_ops.cpp):
// the torch glue around the C launchers of moe_kernels.cu, plus the grouped matmuls, which are one
// at::mm_out (cuBLAS) per expert on narrowed slices, as on the CPU. Autograd is registered on the
// Autograd key in moe_ops.cpp and calls the ops through the dispatcher, so the backward ops below
// serve the CUDA backward (and double backward) too.
//
// Same shape / dtype / device checks and messages as the CPU kernels (shared through
// ../moe_checks.h); inputs are made contiguous; work is queued on the current CUDA stream of the
// tensors' device.
//
// Value checks that would need a host synchronisation are skipped on CUDA (the CPU kernels raise):
//   - moe_permute does not check topk_ids in [0, num_experts): an out-of-range id goes to a bucket
//     after the last expert, so sorted_slots is still a permutation but expert_offsets[E] < T*k,
//     which the grouped matmuls below reject (they read the offsets on the host anyway);
//   - gather / gather_backward / scatter_combine(_backward) do not check that sorted_slots is a
//     permutation of [0, T*k): the kernels never read or write out of bounds, but an out-of-range
//     or repeated slot gives unspecified values (zero rows where a slot is out of range).
// The grouped matmuls copy expert_offsets to the host once per call (one synchronisation) and do
// run the CPU kernels' offset checks.
//
// Built only into a CUDA build of the extension (setup.py with a CUDA torch and nvcc, or CMake
// with CUDA); compile-checked against the CPU torch headers by scripts/check_cuda_compile.sh.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "../moe_checks.h"
#include "../moe_ops.h"
#include "cuda_glue.h"
#include "moe_kernels.h"

namespace revengine {
namespace {

using namespace ::revengine::detail;
using namespace ::revengine::cuda_glue;

int index_code(at::ScalarType t) {
  switch (t) {
    case at::kShort:
      return REVENGINE_CUDA_INT16;
    case at::kInt:
      return REVENGINE_CUDA_INT32;
    case at::kLong:
      return REVENGINE_CUDA_INT64;
    default:
      TORCH_INTERNAL_ASSERT(false, "revengine: no CUDA MoE kernel for index dtype ", t);
  }
  return -1;
}

// ---------------------------------------------------------------------------------------------
// CUDA kernels
// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> moe_permute_cuda(const at::Tensor& topk_ids, int64_t num_experts) {
  check_permute_args(topk_ids, num_experts);
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  const at::Tensor ids = topk_ids.contiguous();
  const int64_t n = ids.numel();
  const auto lopts = ids.options().dtype(at::kLong);
  at::Tensor slots = at::empty({n}, lopts);
  at::Tensor offsets = at::empty({num_experts + 1}, lopts);
  const int64_t ws_bytes = revengine_cuda_moe_permute_workspace(n, num_experts);
  TORCH_CHECK(ws_bytes >= 0, "revengine::moe_permute: num_experts = ", num_experts,
              " is too large for the CUDA kernel (at most 2^31 - 2)");
  at::Tensor ws = at::empty({ws_bytes}, ids.options().dtype(at::kByte));
  check_launch("moe_permute",
               revengine_cuda_moe_permute(ids.const_data_ptr(), index_code(ids.scalar_type()), n, num_experts,
                                          slots.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
                                          ws_bytes > 0 ? ws.data_ptr() : nullptr, ws_bytes, current_stream(ids)));
  return {slots, offsets};
}

at::Tensor moe_gather_cuda(const at::Tensor& x, const at::Tensor& sorted_slots, int64_t k) {
  check_gather_args(x, sorted_slots, k);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor sc = sorted_slots.contiguous();
  const int64_t N = sc.numel(), H = xc.size(1);
  at::Tensor out = at::empty({N, H}, xc.options());
  if (N == 0 || H == 0) return out;
  check_launch("moe_gather", revengine_cuda_moe_gather(xc.const_data_ptr(), dtype_code(xc.scalar_type()),
                                                       sc.const_data_ptr<int64_t>(), N, k, H, out.data_ptr(),
                                                       current_stream(xc)));
  return out;
}

at::Tensor moe_gather_backward_cuda(const at::Tensor& grad_out, const at::Tensor& sorted_slots, int64_t k) {
  check_gather_backward_args(grad_out, sorted_slots, k);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor sc = sorted_slots.contiguous();
  const int64_t N = g.size(0), H = g.size(1), T = N / k;
  at::Tensor dx = at::empty({T, H}, g.options());
  if (T == 0 || H == 0) return dx;
  at::Tensor pos = at::empty({N}, sc.options());
  check_launch("moe_gather_backward",
               revengine_cuda_moe_gather_backward(g.const_data_ptr(), dtype_code(g.scalar_type()),
                                                  sc.const_data_ptr<int64_t>(), N, k, H, dx.data_ptr(),
                                                  pos.data_ptr<int64_t>(), current_stream(g)));
  return dx;
}

// cuBLAS through at::mm_out per expert: the device-agnostic implementation, under a device guard.
at::Tensor moe_grouped_mm_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& expert_offsets) {
  const c10::cuda::CUDAGuard guard(x.device());
  return ops::grouped_mm_per_expert(x, weight, expert_offsets);
}

at::Tensor moe_grouped_mm_weight_grad_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                           const at::Tensor& expert_offsets) {
  const c10::cuda::CUDAGuard guard(x.device());
  return ops::grouped_mm_weight_grad_per_expert(grad_out, x, expert_offsets);
}

at::Tensor moe_scatter_combine_cuda(const at::Tensor& y, const at::Tensor& weights, const at::Tensor& sorted_slots,
                                    int64_t num_tokens) {
  check_combine_args(y, weights, sorted_slots, num_tokens);
  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor yc = y.contiguous();
  const at::Tensor wc = opmath_weights(weights, y.scalar_type());
  const at::Tensor sc = sorted_slots.contiguous();
  const int64_t T = num_tokens, k = weights.size(1), H = yc.size(1);
  at::Tensor out = at::empty({T, H}, yc.options());
  if (T == 0 || H == 0) return out;
  if (k == 0) return out.zero_();
  at::Tensor pos = at::empty({T * k}, sc.options());
  check_launch("moe_scatter_combine",
               revengine_cuda_moe_scatter_combine(yc.const_data_ptr(), dtype_code(yc.scalar_type()),
                                                  wc.const_data_ptr(), sc.const_data_ptr<int64_t>(), T, k, H,
                                                  out.data_ptr(), pos.data_ptr<int64_t>(), current_stream(yc)));
  return out;
}

std::tuple<at::Tensor, at::Tensor> moe_scatter_combine_backward_cuda(const at::Tensor& grad_out, const at::Tensor& y,
                                                                     const at::Tensor& weights,
                                                                     const at::Tensor& sorted_slots) {
  check_combine_backward_args(grad_out, y, weights, sorted_slots);
  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor gc = grad_out.contiguous();
  const at::Tensor yc = y.contiguous();
  const at::Tensor wc = opmath_weights(weights, y.scalar_type());
  const at::Tensor sc = sorted_slots.contiguous();
  const int64_t T = weights.size(0), k = weights.size(1), H = yc.size(1);
  at::Tensor dy = at::empty({T * k, H}, yc.options());
  at::Tensor dw = at::empty({T, k}, wc.options());
  if (T * k > 0) {
    check_launch("moe_scatter_combine_backward",
                 revengine_cuda_moe_scatter_combine_backward(
                     gc.const_data_ptr(), yc.const_data_ptr(), dtype_code(yc.scalar_type()), wc.const_data_ptr(),
                     sc.const_data_ptr<int64_t>(), T, k, H, dy.data_ptr(), dw.data_ptr(), current_stream(yc)));
  }
  return {dy, dw.to(weights.scalar_type())};
}

}  // namespace
}  // namespace revengine

TORCH_LIBRARY_IMPL(revengine, CUDA, m) {
  using namespace revengine;
  m.impl("moe_permute", TORCH_FN(moe_permute_cuda));
  m.impl("moe_gather", TORCH_FN(moe_gather_cuda));
  m.impl("moe_gather_backward", TORCH_FN(moe_gather_backward_cuda));
  m.impl("moe_grouped_mm", TORCH_FN(moe_grouped_mm_cuda));
  m.impl("moe_grouped_mm_weight_grad", TORCH_FN(moe_grouped_mm_weight_grad_cuda));
  m.impl("moe_scatter_combine", TORCH_FN(moe_scatter_combine_cuda));
  m.impl("moe_scatter_combine_backward", TORCH_FN(moe_scatter_combine_backward_cuda));
}
