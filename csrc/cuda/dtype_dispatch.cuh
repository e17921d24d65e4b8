// Shared by the torch-free .cu files: dtype code -> compile-time constant, and the grid size.
#pragma once
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

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

constexpr int kThreads = 256;  // threads per block of every kernel

// Blocks of kThreads for `threads` threads of work (at least one): at most one full wave of
// resident blocks (the loops are grid-stride). The device attributes are cached per device
// (SM count << 32 | threads per SM).
inline int grid_size(int64_t threads) {
  static std::atomic<int64_t> cache[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) dev = 0;
  int64_t info = dev < 64 ? cache[dev].load(std::memory_order_relaxed) : 0;
  if (info == 0) {
    int sms = 0, tps = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) sms = 132;
    if (cudaDeviceGetAttribute(&tps, cudaDevAttrMaxThreadsPerMultiProcessor, dev) != cudaSuccess || tps <= 0) {
      tps = 2048;
    }
    info = (static_cast<int64_t>(sms) << 32) | tps;
    if (dev < 64) cache[dev].store(info, std::memory_order_relaxed);
  }
  const int64_t sms = info >> 32, blocks_per_sm = (info & 0xffffffff) / kThreads;
  const int64_t wave = sms * (blocks_per_sm > 0 ? blocks_per_sm : 1);
  int64_t need = (threads + kThreads - 1) / kThreads;
  if (need < 1) need = 1;
  return static_cast<int>(need < wave ? need : wave);
}

}  // namespace revengine_cuda
