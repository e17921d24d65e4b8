// dtype code -> compile-time constant, shared by the torch-free .cu files.
#pragma once
#include <cuda_runtime.h>

#include "coupling_kernels.h"

namespace revengine_cuda {

template <int D>
struct DT {
  static constexpr int value = D;
};

// Calls fn(DT<code>{}) for the floating dtype codes; cudaErrorInvalidValue for the others.
template <typename Fn>
int dispatch1(int dt, Fn&& fn) {
  switch (dt) {
    case REVENGINE_CUDA_FLOAT32:
      return fn(DT<REVENGINE_CUDA_FLOAT32>{});
    case REVENGINE_CUDA_FLOAT64:
      return fn(DT<REVENGINE_CUDA_FLOAT64>{});
    case REVENGINE_CUDA_BFLOAT16:
      return fn(DT<REVENGINE_CUDA_BFLOAT16>{});
    case REVENGINE_CUDA_FLOAT16:
      return fn(DT<REVENGINE_CUDA_FLOAT16>{});
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace revengine_cuda
