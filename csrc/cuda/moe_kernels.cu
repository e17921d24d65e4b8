// CUDA kernels of revengine's MoE routing ops: the twins of the CPU kernels in csrc/moe_ops.cpp,
// behind the C launchers of moe_kernels.h. No torch here (compile-checked alone with nvcc by
// scripts/check_cuda_compile.sh); the torch glue is moe_ops_cuda.cpp (which also does the grouped
// matmuls: one cuBLAS matmul per expert through ATen, no kernel of ours).
//
//   moe_permute   stable counting sort of the n = T*k slots by expert, O(n + (E+1) * chunks), no
//                 atomics, deterministic: the slots are cut into `chunks` contiguous chunks, one
//                 warp per chunk. Pass 1: each warp counts its chunk per expert, 32 slots at a time
//                 (__match_any_sync groups the lanes with the same expert; the lowest lane of a
//                 group adds the group's size) into counters[e][chunk]. Pass 2 (one block): an
//                 exclusive scan of the counters in (expert, chunk) order turns each counter into
//                 the first output position of that chunk's slots of that expert, and
//                 expert_offsets[e] = counters[e][0]. Pass 3: each warp walks its chunk again in the
//                 same order; a lane's position is its chunk's cursor for its expert plus its rank
//                 among the earlier lanes of its group, and the group's lowest lane advances the
//                 cursor. Slots of one expert thus land in ascending order: chunks in order, tiles
//                 of 32 in order, lanes in order (stable, like the CPU kernel).
//   moe_gather    row copies out[i] = x[slots[i] / k], in 16/8/4/2-byte units (the widest that the
//                 row size and both pointers allow); a group of threads per row.
//   moe_gather_backward / moe_scatter_combine
//                 the inverse permutation pos[slots[i]] = i first (one scatter), then a group of
//                 threads per token row, each thread summing its column over j = 0..k-1 in order
//                 (no atomics, fixed order, as the CPU kernels).
//   moe_scatter_combine_backward
//                 a group of <= 32 lanes per row i of y: grad_y[i] = w[s] * grad_out[s / k] and the
//                 dot product grad_w[s] = <grad_out[s / k], y[i]> (lane partial sums, then an xor
//                 shuffle tree), s = slots[i]: no inverse permutation needed.
//
// Arithmetic (contract of csrc/moe_ops.cpp): opmath = float for bfloat16/float16, else the dtype;
// every product and sum is an explicitly rounded intrinsic (__fmul_rn, __fadd_rn, __dmul_rn, ...),
// which nvcc never contracts into an FMA, and loads/stores convert as the CPU does (exact widening;
// one rounding to nearest even), so all results except grad_weights' dot products are bit-identical
// to the CPU kernels. Do not build with -ftz=true / --use_fast_math.
//
// Index values are not validated here (the CPU kernels raise; that needs a host sync on CUDA): the
// kernels stay in bounds whatever the indices are (see moe_kernels.h for what invalid ones give).
#include "moe_kernels.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "dtype_dispatch.cuh"

#include <atomic>
#include <cstdint>

namespace {

using revengine_cuda::kThreads;
constexpr int kScanThreads = 1024;
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------------
// Element types, by dtype code: storage, opmath type, load (exact widening), store (one rounding
// to nearest even; NaN as the CPU stores it). Same conversions as coupling_kernels.cu.
// ---------------------------------------------------------------------------------------------
template <int DT>
struct Elem;

template <>
struct Elem<REVENGINE_CUDA_FLOAT32> {
  using storage = float;
  using op = float;
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};

template <>
struct Elem<REVENGINE_CUDA_FLOAT64> {
  using storage = double;
  using op = double;
  static __device__ __forceinline__ double load(double v) { return v; }
  static __device__ __forceinline__ double store(double v) { return v; }
};

template <>
struct Elem<REVENGINE_CUDA_BFLOAT16> {
  using storage = uint16_t;
  using op = float;
  static __device__ __forceinline__ float load(uint16_t v) { return __uint_as_float(static_cast<uint32_t>(v) << 16); }
  // As c10::BFloat16(float): round to nearest even, NaN -> 0x7FC0.
  static __device__ __forceinline__ uint16_t store(float v) {
    const uint32_t u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
    return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
};

template <>
struct Elem<REVENGINE_CUDA_FLOAT16> {
  using storage = uint16_t;
  using op = float;
  static __device__ __forceinline__ float load(uint16_t v) { return __half2float(__ushort_as_half(v)); }
  // Round to nearest even, overflow -> inf; NaN -> 0x7E00 with the sign kept (as c10::Half).
  static __device__ __forceinline__ uint16_t store(float v) {
    const uint32_t u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>(((u >> 16) & 0x8000u) | 0x7e00u);
    return __half_as_ushort(__float2half_rn(v));
  }
};

template <int DT>
using st_t = typename Elem<DT>::storage;
template <int DT>
using op_t = typename Elem<DT>::op;

// Explicitly rounded arithmetic: never contracted into an FMA.
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Lanes of the (full) warp holding the same key.
__device__ __forceinline__ unsigned match_any(long long key) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700
  unsigned peers = 0;  // no __match_any_sync before sm_70
  for (int l = 0; l < 32; ++l) peers |= (__shfl_sync(kFullMask, key, l) == key ? 1u : 0u) << l;
  return peers;
#else
  return __match_any_sync(kFullMask, key);
#endif
}

// ---------------------------------------------------------------------------------------------
// moe_permute
// ---------------------------------------------------------------------------------------------
constexpr int64_t kMinChunk = 256;              // slots per warp chunk, at least (8 tiles of 32)
constexpr int64_t kMaxCounters = int64_t(1) << 18;  // (E+1) * chunks, at most (unless E+1 alone is more)
constexpr int64_t kMaxExperts = (int64_t(1) << 31) - 2;

struct PermutePlan {
  int64_t buckets;    // E + 1: the experts, then one bucket for out-of-range ids
  int64_t chunks;     // warp chunks
  int64_t chunk_len;  // slots per chunk (the last one may be shorter or empty)
  int64_t counters;   // buckets * chunks
};

PermutePlan permute_plan(int64_t n, int64_t num_experts) {
  PermutePlan p;
  p.buckets = num_experts + 1;
  int64_t cap = kMaxCounters / p.buckets;
  if (cap < 1) cap = 1;
  int64_t chunks = (n + kMinChunk - 1) / kMinChunk;
  if (chunks > cap) chunks = cap;
  if (chunks < 1) chunks = 1;
  p.chunk_len = (n + chunks - 1) / chunks;
  if (p.chunk_len < 1) p.chunk_len = 1;
  p.chunks = chunks;
  p.counters = p.buckets * chunks;
  return p;
}

template <typename I>
__device__ __forceinline__ long long bucket_of(I id, int64_t num_experts) {
  const int64_t e = static_cast<int64_t>(id);
  return (e >= 0 && e < num_experts) ? e : num_experts;
}

// Pass 1 (kScatter = false): counters[b * chunks + c] = slots of bucket b in chunk c (zeroed first).
// Pass 3 (kScatter = true): counters hold each (bucket, chunk)'s first output position; writes
// sorted_slots. One warp per chunk (grid-stride over chunks); a chunk's counters are touched by
// its warp only, and inside the warp by one lane per bucket per tile: no atomics.
template <bool kScatter, typename I>
__global__ void __launch_bounds__(kThreads)
    permute_pass_kernel(const I* __restrict__ ids, int64_t n, int64_t num_experts, int64_t chunks, int64_t chunk_len,
                        unsigned long long* counters, int64_t* __restrict__ sorted_slots) {
  const int lane = threadIdx.x & 31;
  const unsigned lower = (1u << lane) - 1u;  // lanes below this one
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t c = warp; c < chunks; c += nwarps) {  // warp-uniform
    const int64_t begin = c * chunk_len;
    const int64_t end = min64(n, begin + chunk_len);
    for (int64_t base = begin; base < end; base += 32) {  // warp-uniform: every lane shuffles
      const int64_t i = base + lane;
      const long long b = i < end ? bucket_of(ids[i], num_experts) : -1;
      const unsigned peers = match_any(b);
      const unsigned rank = __popc(peers & lower);  // earlier lanes with the same bucket
      unsigned long long* cnt = counters + (b >= 0 ? b : 0) * chunks + c;
      if constexpr (kScatter) {
        unsigned long long start = 0;
        if (b >= 0) {
          start = *cnt;
          sorted_slots[start + rank] = i;
        }
        __syncwarp();  // every lane has read its cursor before its group's first lane advances it
        if (b >= 0 && rank == 0) *cnt = start + __popc(peers);
      } else {
        if (b >= 0 && rank == 0) *cnt += __popc(peers);
      }
      __syncwarp();  // the updates are visible to the next tile's reads
    }
  }
}

// Pass 2, one block: exclusive scan of the counters (each thread a contiguous segment: its sum,
// a block scan of the sums, then the segment rewritten), then expert_offsets[b] = counters[b][0].
__global__ void __launch_bounds__(kScanThreads)
    permute_scan_kernel(unsigned long long* counters, int64_t count, int64_t chunks, int64_t buckets,
                        int64_t* __restrict__ expert_offsets) {
  __shared__ unsigned long long warp_sums[kScanThreads / 32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t per = (count + kScanThreads - 1) / kScanThreads;
  const int64_t begin = min64(count, tid * per), end = min64(count, begin + per);
  unsigned long long sum = 0;
  for (int64_t i = begin; i < end; ++i) sum += counters[i];
  unsigned long long incl = sum;  // inclusive scan within the warp
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned long long v = __shfl_up_sync(kFullMask, incl, o);
    if (lane >= o) incl += v;
  }
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {  // exclusive scan of the 32 warp sums
    const unsigned long long w = warp_sums[lane];
    unsigned long long wi = w;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned long long v = __shfl_up_sync(kFullMask, wi, o);
      if (lane >= o) wi += v;
    }
    warp_sums[lane] = wi - w;
  }
  __syncthreads();
  unsigned long long run = warp_sums[warp] + incl - sum;  // exclusive prefix of this segment
  for (int64_t i = begin; i < end; ++i) {
    const unsigned long long c = counters[i];
    counters[i] = run;
    run += c;
  }
  __syncthreads();  // the block's global writes are visible to the block
  for (int64_t b = tid; b < buckets; b += kScanThreads) {
    expert_offsets[b] = static_cast<int64_t>(counters[b * chunks]);
  }
}

// ---------------------------------------------------------------------------------------------
// Row kernels: a group of tpr = 2^tpr_log2 threads per row (tpr <= kThreads), kThreads / tpr rows
// per block, grid-stride over the rows (the loop bound is block-uniform).
// ---------------------------------------------------------------------------------------------
#define REVENGINE_ROW_LOOP(ROWS)                                                                    \
  const int tpr = 1 << tpr_log2;                                                                  \
  const int lane = static_cast<int>(threadIdx.x) & (tpr - 1);                                     \
  const int64_t rows_per_block = kThreads >> tpr_log2;                                            \
  const int64_t sub = static_cast<int64_t>(threadIdx.x) >> tpr_log2;                              \
  for (int64_t row_base = static_cast<int64_t>(blockIdx.x) * rows_per_block; row_base < (ROWS);     \
       row_base += static_cast<int64_t>(gridDim.x) * rows_per_block)

template <typename U>
__global__ void __launch_bounds__(kThreads)
    gather_kernel(const U* __restrict__ x, const int64_t* __restrict__ slots, int64_t n, int64_t k, int64_t units,
                  U* __restrict__ out, int tpr_log2) {
  REVENGINE_ROW_LOOP(n) {
    const int64_t i = row_base + sub;
    if (i >= n) continue;
    const int64_t s = slots[i];
    U* o = out + i * units;
    if (s >= 0 && s < n) {
      const U* src = x + (s / k) * units;
      for (int64_t u = lane; u < units; u += tpr) o[u] = src[u];
    } else {
      for (int64_t u = lane; u < units; u += tpr) o[u] = U{};
    }
  }
}

// pos[slots[i]] = i for the slots in range (pos is filled with -1 first).
__global__ void __launch_bounds__(kThreads)
    inverse_kernel(const int64_t* __restrict__ slots, int64_t n, int64_t* __restrict__ pos) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t s = slots[i];
    if (s >= 0 && s < n) pos[s] = i;
  }
}

// dx[t, h] = sum_j g[pos[t*k + j], h], j = 0..k-1 in order.
template <int DT>
__global__ void __launch_bounds__(kThreads)
    gather_backward_kernel(const st_t<DT>* __restrict__ g, const int64_t* __restrict__ pos, int64_t T, int64_t k,
                           int64_t H, st_t<DT>* __restrict__ dx, int tpr_log2) {
  using op = op_t<DT>;
  REVENGINE_ROW_LOOP(T) {
    const int64_t t = row_base + sub;
    if (t >= T) continue;
    const int64_t* pt = pos + t * k;
    for (int64_t h = lane; h < H; h += tpr) {
      op acc = op(0);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t p = pt[j];
        if (p >= 0) acc = add_rn(acc, Elem<DT>::load(g[p * H + h]));
      }
      dx[t * H + h] = Elem<DT>::store(acc);
    }
  }
}

// out[t, h] = sum_j w[t*k + j] * y[pos[t*k + j], h], j = 0..k-1 in order.
template <int DT>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(const st_t<DT>* __restrict__ y, const op_t<DT>* __restrict__ w, const int64_t* __restrict__ pos,
                   int64_t T, int64_t k, int64_t H, st_t<DT>* __restrict__ out, int tpr_log2) {
  using op = op_t<DT>;
  REVENGINE_ROW_LOOP(T) {
    const int64_t t = row_base + sub;
    if (t >= T) continue;
    const int64_t* pt = pos + t * k;
    const op* wt = w + t * k;
    for (int64_t h = lane; h < H; h += tpr) {
      op acc = op(0);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t p = pt[j];
        if (p >= 0) acc = add_rn(acc, mul_rn(wt[j], Elem<DT>::load(y[p * H + h])));
      }
      out[t * H + h] = Elem<DT>::store(acc);
    }
  }
}

// Row i of y (s = slots[i], t = s / k): dy[i] = w[s] * g[t]; dw[s] = <g[t], y[i]>. tpr <= 32, so a
// row's lanes sit in one warp and the xor shuffles (offsets < tpr) stay inside the row's group;
// every lane of every warp reaches them (the row loop is block-uniform, no early exit).
template <int DT>
__global__ void __launch_bounds__(kThreads)
    combine_backward_kernel(const st_t<DT>* __restrict__ g, const st_t<DT>* __restrict__ y,
                            const op_t<DT>* __restrict__ w, const int64_t* __restrict__ slots, int64_t n, int64_t k,
                            int64_t H, st_t<DT>* __restrict__ dy, op_t<DT>* __restrict__ dw, int tpr_log2) {
  using op = op_t<DT>;
  REVENGINE_ROW_LOOP(n) {
    const int64_t i = row_base + sub;
    const int64_t s = i < n ? slots[i] : -1;
    const bool valid = s >= 0 && s < n;
    op partial = op(0);
    if (i < n) {
      st_t<DT>* d = dy + i * H;
      if (valid) {
        const op ws = w[s];
        const st_t<DT>* gr = g + (s / k) * H;
        const st_t<DT>* yr = y + i * H;
        for (int64_t h = lane; h < H; h += tpr) {
          const op gh = Elem<DT>::load(gr[h]);
          d[h] = Elem<DT>::store(mul_rn(ws, gh));
          partial = add_rn(partial, mul_rn(gh, Elem<DT>::load(yr[h])));
        }
      } else {
        for (int64_t h = lane; h < H; h += tpr) d[h] = Elem<DT>::store(op(0));
      }
    }
    for (int o = tpr >> 1; o > 0; o >>= 1) partial = add_rn(partial, __shfl_xor_sync(kFullMask, partial, o));
    if (valid && lane == 0) dw[s] = partial;
  }
}

#undef REVENGINE_ROW_LOOP

// ---------------------------------------------------------------------------------------------
// Launch helpers
// ---------------------------------------------------------------------------------------------
using revengine_cuda::grid_size;

// log2 of the threads per row: the smallest power of two >= min(width, cap), cap a power of two.
int tpr_log2_for(int64_t width, int cap) {
  int l = 0;
  while ((1 << l) < cap && (1 << l) < width) ++l;
  return l;
}

// Blocks for `rows` rows of 2^tpr_log2 threads.
int row_grid(int64_t rows, int tpr_log2) { return grid_size(rows << tpr_log2); }

inline bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

inline int invalid() { return static_cast<int>(cudaErrorInvalidValue); }

using revengine_cuda::dispatch1;
using revengine_cuda::DT;

template <typename T>
struct IdType {
  using type = T;
};

template <typename Fn>
int dispatch_index(int dt, Fn&& fn) {
  switch (dt) {
    case REVENGINE_CUDA_INT16:
      return fn(IdType<int16_t>{});
    case REVENGINE_CUDA_INT32:
      return fn(IdType<int32_t>{});
    case REVENGINE_CUDA_INT64:
      return fn(IdType<int64_t>{});
    default:
      return invalid();
  }
}

int elem_size(int dt) {
  switch (dt) {
    case REVENGINE_CUDA_FLOAT32:
      return 4;
    case REVENGINE_CUDA_FLOAT64:
      return 8;
    case REVENGINE_CUDA_BFLOAT16:
    case REVENGINE_CUDA_FLOAT16:
      return 2;
    default:
      return 0;
  }
}

template <typename U>
int launch_gather(const void* x, const int64_t* slots, int64_t n, int64_t k, int64_t row_bytes, void* out,
                  cudaStream_t stream) {
  const int64_t units = row_bytes / static_cast<int64_t>(sizeof(U));
  const int l = tpr_log2_for(units, kThreads);
  gather_kernel<U><<<row_grid(n, l), kThreads, 0, stream>>>(static_cast<const U*>(x), slots, n, k, units,
                                                            static_cast<U*>(out), l);
  return static_cast<int>(cudaGetLastError());
}

// pos[s] = i for sorted_slots[i] = s, -1 where no slot points.
int build_inverse(const int64_t* slots, int64_t n, int64_t* pos, cudaStream_t stream) {
  const cudaError_t e = cudaMemsetAsync(pos, 0xff, static_cast<size_t>(n) * sizeof(int64_t), stream);
  if (e != cudaSuccess) return static_cast<int>(e);
  inverse_kernel<<<grid_size(n), kThreads, 0, stream>>>(slots, n, pos);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// C launchers
// ---------------------------------------------------------------------------------------------
extern "C" {

int64_t revengine_cuda_moe_permute_workspace(int64_t n, int64_t num_experts) {
  if (n < 0 || num_experts < 1 || num_experts > kMaxExperts) return -1;
  if (n == 0) return 0;
  return permute_plan(n, num_experts).counters * static_cast<int64_t>(sizeof(unsigned long long));
}

int revengine_cuda_moe_permute(const void* topk_ids, int id_dtype, int64_t n, int64_t num_experts,
                               int64_t* sorted_slots, int64_t* expert_offsets, void* workspace,
                               int64_t workspace_bytes, void* stream) {
  if (n < 0 || num_experts < 1 || num_experts > kMaxExperts || expert_offsets == nullptr) return invalid();
  const cudaStream_t s = as_stream(stream);
  if (n == 0) {
    return dispatch_index(id_dtype, [&](auto) {
      return static_cast<int>(
          cudaMemsetAsync(expert_offsets, 0, static_cast<size_t>(num_experts + 1) * sizeof(int64_t), s));
    });
  }
  const PermutePlan p = permute_plan(n, num_experts);
  if (topk_ids == nullptr || sorted_slots == nullptr || workspace == nullptr ||
      workspace_bytes < p.counters * static_cast<int64_t>(sizeof(unsigned long long))) {
    return invalid();
  }
  return dispatch_index(id_dtype, [&](auto tag) {
    using I = typename decltype(tag)::type;
    const I* ids = static_cast<const I*>(topk_ids);
    auto* counters = static_cast<unsigned long long*>(workspace);
    cudaError_t e = cudaMemsetAsync(counters, 0, static_cast<size_t>(p.counters) * sizeof(unsigned long long), s);
    if (e != cudaSuccess) return static_cast<int>(e);
    const int blocks = grid_size(p.chunks * 32);
    permute_pass_kernel<false, I>
        <<<blocks, kThreads, 0, s>>>(ids, n, num_experts, p.chunks, p.chunk_len, counters, sorted_slots);
    if ((e = cudaGetLastError()) != cudaSuccess) return static_cast<int>(e);
    permute_scan_kernel<<<1, kScanThreads, 0, s>>>(counters, p.counters, p.chunks, p.buckets, expert_offsets);
    if ((e = cudaGetLastError()) != cudaSuccess) return static_cast<int>(e);
    permute_pass_kernel<true, I>
        <<<blocks, kThreads, 0, s>>>(ids, n, num_experts, p.chunks, p.chunk_len, counters, sorted_slots);
    return static_cast<int>(cudaGetLastError());
  });
}

int revengine_cuda_moe_gather(const void* x, int dtype, const int64_t* sorted_slots, int64_t n, int64_t k, int64_t H,
                              void* out, void* stream) {
  const int es = elem_size(dtype);
  if (es == 0 || n < 0 || k < 1 || H < 0 || n % k != 0) return invalid();
  if (n == 0 || H == 0) return 0;
  const cudaStream_t s = as_stream(stream);
  const int64_t row_bytes = H * es;
  // The widest unit that divides the row and to which both base pointers are aligned.
  if (row_bytes % 16 == 0 && aligned(x, 16) && aligned(out, 16)) {
    return launch_gather<uint4>(x, sorted_slots, n, k, row_bytes, out, s);
  }
  if (row_bytes % 8 == 0 && aligned(x, 8) && aligned(out, 8)) {
    return launch_gather<uint2>(x, sorted_slots, n, k, row_bytes, out, s);
  }
  if (row_bytes % 4 == 0 && aligned(x, 4) && aligned(out, 4)) {
    return launch_gather<uint32_t>(x, sorted_slots, n, k, row_bytes, out, s);
  }
  return launch_gather<uint16_t>(x, sorted_slots, n, k, row_bytes, out, s);
}

int revengine_cuda_moe_gather_backward(const void* grad_out, int dtype, const int64_t* sorted_slots, int64_t n,
                                       int64_t k, int64_t H, void* dx, int64_t* pos_workspace, void* stream) {
  if (n < 0 || k < 1 || H < 0 || n % k != 0) return invalid();
  return dispatch1(dtype, [&](auto d) {
    constexpr int D = decltype(d)::value;
    const int64_t T = n / k;
    if (T == 0 || H == 0) return 0;
    if (pos_workspace == nullptr) return invalid();
    const cudaStream_t s = as_stream(stream);
    const int e = build_inverse(sorted_slots, n, pos_workspace, s);
    if (e != 0) return e;
    const int l = tpr_log2_for(H, kThreads);
    gather_backward_kernel<D><<<row_grid(T, l), kThreads, 0, s>>>(static_cast<const st_t<D>*>(grad_out),
                                                                   pos_workspace, T, k, H,
                                                                   static_cast<st_t<D>*>(dx), l);
    return static_cast<int>(cudaGetLastError());
  });
}

int revengine_cuda_moe_scatter_combine(const void* y, int dtype, const void* weights, const int64_t* sorted_slots,
                                       int64_t T, int64_t k, int64_t H, void* out, int64_t* pos_workspace,
                                       void* stream) {
  if (T < 0 || k < 0 || H < 0) return invalid();
  return dispatch1(dtype, [&](auto d) {
    constexpr int D = decltype(d)::value;
    if (T == 0 || H == 0) return 0;
    const cudaStream_t s = as_stream(stream);
    if (k == 0) return static_cast<int>(cudaMemsetAsync(out, 0, static_cast<size_t>(T * H) * sizeof(st_t<D>), s));
    if (pos_workspace == nullptr) return invalid();
    const int e = build_inverse(sorted_slots, T * k, pos_workspace, s);
    if (e != 0) return e;
    const int l = tpr_log2_for(H, kThreads);
    combine_kernel<D><<<row_grid(T, l), kThreads, 0, s>>>(static_cast<const st_t<D>*>(y),
                                                           static_cast<const op_t<D>*>(weights), pos_workspace, T,
                                                           k, H, static_cast<st_t<D>*>(out), l);
    return static_cast<int>(cudaGetLastError());
  });
}

int revengine_cuda_moe_scatter_combine_backward(const void* grad_out, const void* y, int dtype, const void* weights,
                                                const int64_t* sorted_slots, int64_t T, int64_t k, int64_t H,
                                                void* grad_y, void* grad_weights, void* stream) {
  if (T < 0 || k < 0 || H < 0) return invalid();
  return dispatch1(dtype, [&](auto d) {
    constexpr int D = decltype(d)::value;
    const int64_t n = T * k;
    if (n == 0) return 0;
    const cudaStream_t s = as_stream(stream);
    const cudaError_t e = cudaMemsetAsync(grad_weights, 0, static_cast<size_t>(n) * sizeof(op_t<D>), s);
    if (e != cudaSuccess) return static_cast<int>(e);
    if (H == 0) return 0;  // grad_y is empty, grad_weights all zero
    const int l = tpr_log2_for(H, 32);
    combine_backward_kernel<D><<<row_grid(n, l), kThreads, 0, s>>>(
        static_cast<const st_t<D>*>(grad_out), static_cast<const st_t<D>*>(y), static_cast<const op_t<D>*>(weights),
        sorted_slots, n, k, H, static_cast<st_t<D>*>(grad_y), static_cast<op_t<D>*>(grad_weights), l);
    return static_cast<int>(cudaGetLastError());
  });
}

}  // extern "C"
