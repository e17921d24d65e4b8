// Torch glue helpers shared by the CUDA op files (dtype codes, current stream, launch errors).
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>

#include "coupling_kernels.h"

namespace revengine {
namespace cuda_glue {

inline int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return REVENGINE_CUDA_FLOAT32;
    case at::kDouble:
      return REVENGINE_CUDA_FLOAT64;
    case at::kBFloat16:
      return REVENGINE_CUDA_BFLOAT16;
    case at::kHalf:
      return REVENGINE_CUDA_FLOAT16;
    default:
      TORCH_INTERNAL_ASSERT(false, "revengine: no CUDA kernel for dtype ", t);
  }
  return -1;
}

inline void* current_stream(const at::Tensor& t) {
  return static_cast<void*>(c10::cuda::getCurrentCUDAStream(t.device().index()).stream());
}

inline void check_launch(const char* op, int err) {
  TORCH_CHECK(err == 0, "revengine::", op, ": CUDA kernel launch failed: ", revengine_cuda_error_string(err));
}

}  // namespace cuda_glue
}  // namespace revengine
