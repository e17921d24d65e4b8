// CUDA kernels of revengine's element-wise ops: the twins of the CPU kernels in csrc/ops.cpp,
// behind the C launchers of coupling_kernels.h. No torch here (compile-checked alone with nvcc by
// scripts/check_cuda_compile.sh); the torch glue is ops_cuda.cpp.
//
// Arithmetic: exactly the contract in the header comment of csrc/ops.cpp, so that the results are
// bit-identical to the CPU kernels (NaN payloads and NaN signs aside):
//   opmath = float for bfloat16/float16 x, else x's dtype; operands are converted to opmath, the
//   result is rounded once (to nearest even) to x's dtype.
//   coupling_update : fma(lam, x, f)        coupling_inverse: (y - f) / lam
//   affine_update   : fma(x, scale, shift)  affine_inverse  : (y - shift) / scale
//   fixed point     : round_half_even(double(v) * 2^frac_bits) (__double2ll_rn), int64 wrap-around;
//                     dequantize double(q) * 2^-frac_bits -> float -> bfloat16/float16.
//   bdia_step_      : q = round_half_even(double(inc) * ((1 + g) 2^frac_bits)), g = s 2^-k;
//                     u <- s (u >> k) + src - s (src >> k) + q, the k dropped bits packed into low;
//                     bdia_unstep_ its inverse (one thread a byte of low: 8/k elements, or one).
// Every operation is an explicitly rounded intrinsic (fmaf/fma, __fsub_rn, __fdiv_rn, __dmul_rn,
// ...), which nvcc never contracts or approximates whatever -fmad / -prec-div say. Do not build
// this file with -ftz=true or --use_fast_math: flushing subnormals would break the agreement with
// the CPU kernels.
//
// Layout: contiguous buffers; one kernel per (op, dtypes): a grid-stride loop taking 4 elements a
// thread per step with vector loads/stores when every pointer is aligned to 4 elements, else one
// at a time (a run-time choice, so that each op is compiled once). The all-finite flags, the
// bad-element counts and the first bad index are fused into the same pass (warp reduction, then
// one atomic per warp, only when a warp saw a bad element).
// Operand dtypes: the pairs of dispatch_pair below, as on the CPU; the glue converts any other
// operand to x's opmath type first, which is exactly the kernels' own first step.
#include "coupling_kernels.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "dtype_dispatch.cuh"

#include <atomic>
#include <cmath>
#include <cstdint>

namespace {

using revengine_cuda::kThreads;
constexpr int kVec = 4;

// ---------------------------------------------------------------------------------------------
// Element types, by dtype code: storage, opmath type, load (exact widening), store (one rounding
// to nearest even; NaN as the CPU kernels store it), and the "stored value is inf/nan" bit test.
// ---------------------------------------------------------------------------------------------
template <int DT>
struct Elem;

template <>
struct Elem<REVENGINE_CUDA_FLOAT32> {
  using storage = float;
  using op = float;
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
  static __device__ __forceinline__ float store_from_double(double v) { return __double2float_rn(v); }
  static __device__ __forceinline__ uint32_t nonfinite(float v) {
    return (__float_as_uint(v) & 0x7f800000u) == 0x7f800000u;
  }
};

template <>
struct Elem<REVENGINE_CUDA_FLOAT64> {
  using storage = double;
  using op = double;
  static __device__ __forceinline__ double load(double v) { return v; }
  static __device__ __forceinline__ double store(double v) { return v; }
  static __device__ __forceinline__ double store_from_double(double v) { return v; }
  static __device__ __forceinline__ uint32_t nonfinite(double v) {
    return (static_cast<uint64_t>(__double_as_longlong(v)) & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
  }
};

template <>
struct Elem<REVENGINE_CUDA_BFLOAT16> {
  using storage = uint16_t;
  using op = float;
  static __device__ __forceinline__ float load(uint16_t v) { return __uint_as_float(static_cast<uint32_t>(v) << 16); }
  // As c10::BFloat16(float) and the CPU kernels: round to nearest even, NaN -> 0x7FC0.
  static __device__ __forceinline__ uint16_t store(float v) {
    const uint32_t u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
    return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  // torch converts double -> bfloat16 through float; so do the CPU kernels.
  static __device__ __forceinline__ uint16_t store_from_double(double v) { return store(__double2float_rn(v)); }
  static __device__ __forceinline__ uint32_t nonfinite(uint16_t v) { return (v & 0x7f80u) == 0x7f80u; }
};

template <>
struct Elem<REVENGINE_CUDA_FLOAT16> {
  using storage = uint16_t;
  using op = float;
  static __device__ __forceinline__ float load(uint16_t v) { return __half2float(__ushort_as_half(v)); }
  // Round to nearest even, overflow -> inf (the hardware conversion); NaN -> 0x7E00 with the sign
  // kept, as c10::Half (the CPU kernels' F16C path keeps part of the payload: NaN payloads are
  // outside the contract).
  static __device__ __forceinline__ uint16_t store(float v) {
    const uint32_t u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>(((u >> 16) & 0x8000u) | 0x7e00u);
    return __half_as_ushort(__float2half_rn(v));
  }
  static __device__ __forceinline__ uint16_t store_from_double(double v) { return store(__double2float_rn(v)); }
  static __device__ __forceinline__ uint32_t nonfinite(uint16_t v) { return (v & 0x7c00u) == 0x7c00u; }
};

template <int DT>
using st_t = typename Elem<DT>::storage;
template <int DT>
using op_t = typename Elem<DT>::op;

// Operand value converted to the opmath type `T` (float -> double exact, double -> float RNE).
template <typename T, int DT>
__device__ __forceinline__ T load_as(st_t<DT> v) {
  const op_t<DT> w = Elem<DT>::load(v);
  if constexpr (sizeof(T) == sizeof(w)) {
    return w;
  } else if constexpr (sizeof(T) == sizeof(float)) {
    return __double2float_rn(w);
  } else {
    return static_cast<double>(w);
  }
}

__device__ __forceinline__ float fma_rn(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return fma(a, b, c); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

// |v| >= 2^62, inf or nan, decided on the exponent bits (as the CPU kernels).
__device__ __forceinline__ uint32_t out_of_fixed_range(double v) {
  return (static_cast<uint64_t>(__double_as_longlong(v)) & 0x7ff0000000000000ull) >=
         (static_cast<uint64_t>(1023 + 62) << 52);
}

// ---------------------------------------------------------------------------------------------
// Vector loads and stores of V consecutive elements (V = 1: plain scalar accesses).
// ---------------------------------------------------------------------------------------------
template <typename S, int V>
struct alignas(sizeof(S) * V) Pack {
  S v[V];
};

template <int V, typename S>
__device__ __forceinline__ void load_pack(const S* p, S (&r)[V]) {
  const Pack<S, V> t = *reinterpret_cast<const Pack<S, V>*>(p);
#pragma unroll
  for (int k = 0; k < V; ++k) r[k] = t.v[k];
}

template <int V, typename S>
__device__ __forceinline__ void store_pack(S* p, const S (&r)[V]) {
  Pack<S, V> t;
#pragma unroll
  for (int k = 0; k < V; ++k) t.v[k] = r[k];
  *reinterpret_cast<Pack<S, V>*>(p) = t;
}

// ---------------------------------------------------------------------------------------------
// Per-op functors. run<V>(i) processes elements [i, i + V) and returns a bit mask of the bad
// ones (bit k for element i + k): non-finite stored results for the float ops, non-finite or
// out-of-range inputs for the fixed-point ones. Every operand is read before anything is
// written, so element-for-element aliasing (out == x, f == x) is safe.
// ---------------------------------------------------------------------------------------------
template <int XD, int FD>
struct CouplingFwd {
  st_t<XD>* out;
  const st_t<XD>* x;
  const st_t<FD>* f;
  op_t<XD> lam;
  template <int V>
  __device__ __forceinline__ uint32_t run(int64_t i) const {
    st_t<XD> xs[V], os[V];
    st_t<FD> fs[V];
    load_pack<V>(x + i, xs);
    load_pack<V>(f + i, fs);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      os[k] = Elem<XD>::store(fma_rn(lam, Elem<XD>::load(xs[k]), load_as<op_t<XD>, FD>(fs[k])));
    }
    store_pack<V>(out + i, os);
    return 0;
  }
};

template <int XD, int FD>
struct CouplingInv {
  st_t<XD>* y;
  const st_t<FD>* f;
  op_t<XD> lam;
  template <int V>
  __device__ __forceinline__ uint32_t run(int64_t i) const {
    st_t<XD> ys[V];
    st_t<FD> fs[V];
    load_pack<V>(y + i, ys);
    load_pack<V>(f + i, fs);
    uint32_t bad = 0;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      ys[k] = Elem<XD>::store(div_rn(sub_rn(Elem<XD>::load(ys[k]), load_as<op_t<XD>, FD>(fs[k])), lam));
      bad |= Elem<XD>::nonfinite(ys[k]) << k;
    }
    store_pack<V>(y + i, ys);
    return bad;
  }
};

template <int XD, int SD>
struct AffineFwd {
  st_t<XD>* x;
  const st_t<SD>* scale;
  const st_t<SD>* shift;
  template <int V>
  __device__ __forceinline__ uint32_t run(int64_t i) const {
    st_t<XD> xs[V];
    st_t<SD> ss[V], hs[V];
    load_pack<V>(x + i, xs);
    load_pack<V>(scale + i, ss);
    load_pack<V>(shift + i, hs);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      xs[k] = Elem<XD>::store(
          fma_rn(Elem<XD>::load(xs[k]), load_as<op_t<XD>, SD>(ss[k]), load_as<op_t<XD>, SD>(hs[k])));
    }
    store_pack<V>(x + i, xs);
    return 0;
  }
};

template <int XD, int SD>
struct AffineInv {
  st_t<XD>* y;
  const st_t<SD>* scale;
  const st_t<SD>* shift;
  template <int V>
  __device__ __forceinline__ uint32_t run(int64_t i) const {
    st_t<XD> ys[V];
    st_t<SD> ss[V], hs[V];
    load_pack<V>(y + i, ys);
    load_pack<V>(scale + i, ss);
    load_pack<V>(shift + i, hs);
    uint32_t bad = 0;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      ys[k] = Elem<XD>::store(div_rn(sub_rn(Elem<XD>::load(ys[k]), load_as<op_t<XD>, SD>(hs[k])),
                                     load_as<op_t<XD>, SD>(ss[k])));
      bad |= Elem<XD>::nonfinite(ys[k]) << k;
    }
    store_pack<V>(y + i, ys);
    return bad;
  }
};

// q = round_half_even(double(x) * scale), or 0 (and a bad bit) when out of range.
template <int XD>
__device__ __forceinline__ int64_t quantize_elem(st_t<XD> x, double scale, uint32_t& bad) {
  const double v = __dmul_rn(static_cast<double>(Elem<XD>::load(x)), scale);
  bad = out_of_fixed_range(v);
  return bad ? 0 : __double2ll_rn(v);
}

template <int XD>
struct Quantize {
  const st_t<XD>* x;
  int64_t* q;
  double scale;
  template <int V>
  __device__ __forceinline__ uint32_t run(int64_t i) const {
    st_t<XD> xs[V];
    int64_t qs[V];
    load_pack<V>(x + i, xs);
    uint32_t bad = 0;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      uint32_t b;
      qs[k] = quantize_elem<XD>(xs[k], scale, b);
      bad |= b << k;
    }
    store_pack<V>(q + i, qs);
    return bad;
  }
};

template <int XD>
struct FixedUpdate {
  int64_t* acc;
  const st_t<XD>* inc;
  double scale;
  int64_t sign;
  template <int V>
  __device__ __forceinline__ uint32_t run(int64_t i) const {
    st_t<XD> is[V];
    int64_t as[V];
    load_pack<V>(inc + i, is);
    load_pack<V>(acc + i, as);
    uint32_t bad = 0;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      uint32_t b;
      const int64_t q = quantize_elem<XD>(is[k], scale, b);  // |q| < 2^62: sign * q cannot overflow
      as[k] = static_cast<int64_t>(static_cast<uint64_t>(as[k]) + static_cast<uint64_t>(sign * q));
      bad |= b << k;
    }
    store_pack<V>(acc + i, as);
    return bad;
  }
};

template <int OD>
struct Dequantize {
  const int64_t* q;
  st_t<OD>* out;
  double scale;
  template <int V>
  __device__ __forceinline__ uint32_t run(int64_t i) const {
    int64_t qs[V];
    st_t<OD> os[V];
    load_pack<V>(q + i, qs);
#pragma unroll
    for (int k = 0; k < V; ++k) os[k] = Elem<OD>::store_from_double(__dmul_rn(__ll2double_rn(qs[k]), scale));
    store_pack<V>(out + i, os);
    return 0;
  }
};

template <int XD>
struct AllFinite {
  const st_t<XD>* x;
  template <int V>
  __device__ __forceinline__ uint32_t run(int64_t i) const {
    st_t<XD> xs[V];
    load_pack<V>(x + i, xs);
    uint32_t bad = 0;
#pragma unroll
    for (int k = 0; k < V; ++k) bad |= Elem<XD>::nonfinite(xs[k]) << k;
    return bad;
  }
};

// BDIA's exact step (kForward) or its inverse, one byte of `low` (8/k elements, or one) at a
// time: run<V>(j) does bytes [j, j + V) and returns bit w set when byte j + w had a bad increment
// (non-finite or out of range; it adds 0, so the other direction undoes a launch exactly). Each
// element's operands are read before u is written (src may be u). Elements of sample b are
// [b inner, (b + 1) inner); a negative sign[b] is -1, anything else +1.
template <int XD, bool kForward>
struct BdiaStep {
  int64_t* u;
  const int64_t* src;
  const st_t<XD>* inc;
  const int64_t* sign;
  uint8_t* low;  // written when kForward, else read
  int64_t n, inner;
  double scale_pos, scale_neg;  // (1 + 2^-k) 2^frac_bits, (1 - 2^-k) 2^frac_bits
  int k, per;

  __device__ __forceinline__ uint32_t byte(int64_t j) const {
    const uint64_t mask = (uint64_t{1} << k) - 1;
    uint32_t bits = kForward ? 0u : low[j], bad = 0;
    const int64_t i0 = j * per;
    for (int e = 0; e < per; ++e) {
      const int64_t i = i0 + e;
      if (i >= n) break;
      const bool neg = sign[i / inner] < 0;
      uint32_t b;
      const uint64_t q = static_cast<uint64_t>(quantize_elem<XD>(inc[i], neg ? scale_neg : scale_pos, b));
      bad |= b;
      const int64_t t = src[i];
      const uint64_t th = static_cast<uint64_t>(t >> k);  // arithmetic shift: floor(t / 2^k)
      const uint64_t sth = neg ? 0 - th : th;
      if constexpr (kForward) {
        const int64_t p = u[i];
        bits |= static_cast<uint32_t>(static_cast<uint64_t>(p) & mask) << (e * k);
        const uint64_t h = static_cast<uint64_t>(p >> k);
        u[i] = static_cast<int64_t>((neg ? 0 - h : h) + static_cast<uint64_t>(t) - sth + q);
      } else {
        const uint64_t sh = static_cast<uint64_t>(u[i]) - q - static_cast<uint64_t>(t) + sth;  // s (p >> k)
        const uint64_t h = neg ? 0 - sh : sh;
        u[i] = static_cast<int64_t>((h << k) | ((bits >> (e * k)) & mask));
      }
    }
    if constexpr (kForward) low[j] = static_cast<uint8_t>(bits);
    return bad;
  }

  template <int V>
  __device__ __forceinline__ uint32_t run(int64_t j) const {
    uint32_t bad = 0;
#pragma unroll
    for (int w = 0; w < V; ++w) bad |= byte(j + w) << w;
    return bad;
  }
};

// ---------------------------------------------------------------------------------------------
// The one kernel: a grid-stride loop over groups of kVec elements (when `vec`), the remaining
// elements one at a time, then the report: R = kFlag clears *flag when some bad bit was seen;
// R = kCount adds the number of bad elements to *count and lowers *first to the first bad index.
// ---------------------------------------------------------------------------------------------
enum Report { kNoReport = 0, kFlag = 1, kCount = 2 };

template <int R>
__device__ __forceinline__ void note(uint32_t bad, int64_t base, uint32_t& any, unsigned long long& nbad,
                                     unsigned long long& first_bad) {
  if constexpr (R == kFlag) any |= bad;
  if constexpr (R == kCount) {
    if (bad) {
      nbad += __popc(bad);
      const unsigned long long idx = static_cast<unsigned long long>(base + (__ffs(static_cast<int>(bad)) - 1));
      first_bad = idx < first_bad ? idx : first_bad;
    }
  }
}

template <int R, typename Fn>
__global__ void __launch_bounds__(kThreads)
    elementwise_kernel(Fn fn, int64_t n, bool vec, uint8_t* flag, unsigned long long* count, unsigned long long* first) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  uint32_t any = 0;
  unsigned long long nbad = 0;
  unsigned long long first_bad = ~0ull;  // a thread's indices increase: its first bad one is its min
  int64_t start = tid;
  if (vec) {
    const int64_t nv = n / kVec;
    for (int64_t j = tid; j < nv; j += stride) {
      note<R>(fn.template run<kVec>(j * kVec), j * kVec, any, nbad, first_bad);
    }
    start = nv * kVec + tid;
  }
  for (int64_t i = start; i < n; i += stride) note<R>(fn.template run<1>(i), i, any, nbad, first_bad);
  if constexpr (R == kFlag) {
    if (any) *flag = 0;  // every writer writes the same value
  }
  if constexpr (R == kCount) {
    // Every lane gets here (no early exit, blockDim is a multiple of 32): full-warp shuffles.
    if (__any_sync(0xffffffffu, nbad != 0)) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        nbad += __shfl_down_sync(0xffffffffu, nbad, o);
        const unsigned long long other = __shfl_down_sync(0xffffffffu, first_bad, o);
        first_bad = other < first_bad ? other : first_bad;
      }
      if ((threadIdx.x & 31) == 0 && nbad != 0) {
        atomicAdd(count, nbad);
        atomicMin(first, first_bad);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launch helpers
// ---------------------------------------------------------------------------------------------
using revengine_cuda::grid_size;

inline bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename S>
inline bool vec_ok(const S* p) {
  return aligned(p, sizeof(S) * kVec);
}
template <typename S, typename... Rest>
inline bool vec_ok(const S* p, const Rest*... rest) {
  return vec_ok(p) && vec_ok(rest...);
}

// Launches the kernel for fn (vector path when all pointers are aligned) and returns the launch
// error. `count`/`first` are used when R == kCount, `flag` when R == kFlag.
template <int R, typename Fn, typename... Ptrs>
int launch(const Fn& fn, int64_t n, cudaStream_t stream, uint8_t* flag, int64_t* status, const Ptrs*... ptrs) {
  if (n <= 0) return 0;  // nothing to launch (flags and status are already initialised)
  auto* count = reinterpret_cast<unsigned long long*>(status);
  auto* first = status ? count + 1 : nullptr;
  const bool vec = vec_ok(ptrs...);
  const int64_t groups = vec ? n / kVec : n;
  elementwise_kernel<R, Fn><<<grid_size(groups > 0 ? groups : n), kThreads, 0, stream>>>(fn, n, vec, flag, count,
                                                                                        first);
  return static_cast<int>(cudaGetLastError());
}

int init_flag(uint8_t* flag, cudaStream_t stream) {
  if (flag == nullptr) return 0;
  return static_cast<int>(cudaMemsetAsync(flag, 1, 1, stream));
}

int init_status(int64_t* status, cudaStream_t stream) {
  if (status == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  cudaError_t e = cudaMemsetAsync(status, 0, sizeof(int64_t), stream);  // count
  if (e == cudaSuccess) e = cudaMemsetAsync(status + 1, 0xff, sizeof(int64_t), stream);  // first = -1
  return static_cast<int>(e);
}

using revengine_cuda::dispatch1;
using revengine_cuda::DT;

// The (x, operand) dtype pairs with a kernel, as on the CPU (ops.cpp's has_pair_kernel): the same
// dtype, float32 x with a bfloat16/float16 operand, bfloat16/float16 x with a float32 operand.
template <typename Fn>
int dispatch_pair(int x, int f, Fn&& fn) {
  constexpr int F32 = REVENGINE_CUDA_FLOAT32, BF16 = REVENGINE_CUDA_BFLOAT16, F16 = REVENGINE_CUDA_FLOAT16;
  if (x == f) return dispatch1(x, [&](auto d) { return fn(d, d); });
  if (x == F32 && f == BF16) return fn(DT<F32>{}, DT<BF16>{});
  if (x == F32 && f == F16) return fn(DT<F32>{}, DT<F16>{});
  if (x == BF16 && f == F32) return fn(DT<BF16>{}, DT<F32>{});
  if (x == F16 && f == F32) return fn(DT<F16>{}, DT<F32>{});
  return static_cast<int>(cudaErrorInvalidValue);
}

inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

inline bool valid_frac_bits(int frac_bits) { return frac_bits >= 0 && frac_bits <= 1023; }

}  // namespace

// ---------------------------------------------------------------------------------------------
// C launchers
// ---------------------------------------------------------------------------------------------
extern "C" {

int revengine_cuda_coupling_update(void* out, const void* x, int x_dtype, const void* f, int f_dtype, double lam,
                                   int64_t n, void* stream) {
  return dispatch_pair(x_dtype, f_dtype, [&](auto xd, auto fd) {
    constexpr int XD = decltype(xd)::value;
    constexpr int FD = decltype(fd)::value;
    CouplingFwd<XD, FD> fn{static_cast<st_t<XD>*>(out), static_cast<const st_t<XD>*>(x),
                           static_cast<const st_t<FD>*>(f), static_cast<op_t<XD>>(lam)};
    return launch<kNoReport>(fn, n, as_stream(stream), nullptr, nullptr, fn.out, fn.x, fn.f);
  });
}

int revengine_cuda_coupling_update_(void* x, int x_dtype, const void* f, int f_dtype, double lam, int64_t n,
                                    void* stream) {
  return revengine_cuda_coupling_update(x, x, x_dtype, f, f_dtype, lam, n, stream);
}

int revengine_cuda_coupling_inverse_(void* y, int y_dtype, const void* f, int f_dtype, double lam, int64_t n,
                                     uint8_t* finite_flag, int check_finite, void* stream) {
  return dispatch_pair(y_dtype, f_dtype, [&](auto yd, auto fd) {
    constexpr int XD = decltype(yd)::value;
    constexpr int FD = decltype(fd)::value;
    const int e = init_flag(finite_flag, as_stream(stream));
    if (e != 0) return e;
    CouplingInv<XD, FD> fn{static_cast<st_t<XD>*>(y), static_cast<const st_t<FD>*>(f), static_cast<op_t<XD>>(lam)};
    if (check_finite && finite_flag != nullptr) {
      return launch<kFlag>(fn, n, as_stream(stream), finite_flag, nullptr, fn.y, fn.f);
    }
    return launch<kNoReport>(fn, n, as_stream(stream), nullptr, nullptr, fn.y, fn.f);
  });
}

int revengine_cuda_affine_update_(void* x, int x_dtype, const void* scale, const void* shift, int s_dtype,
                                  int64_t n, void* stream) {
  return dispatch_pair(x_dtype, s_dtype, [&](auto xd, auto sd) {
    constexpr int XD = decltype(xd)::value;
    constexpr int SD = decltype(sd)::value;
    AffineFwd<XD, SD> fn{static_cast<st_t<XD>*>(x), static_cast<const st_t<SD>*>(scale),
                         static_cast<const st_t<SD>*>(shift)};
    return launch<kNoReport>(fn, n, as_stream(stream), nullptr, nullptr, fn.x, fn.scale, fn.shift);
  });
}

int revengine_cuda_affine_inverse_(void* y, int y_dtype, const void* scale, const void* shift, int s_dtype,
                                   int64_t n, uint8_t* finite_flag, int check_finite, void* stream) {
  return dispatch_pair(y_dtype, s_dtype, [&](auto yd, auto sd) {
    constexpr int XD = decltype(yd)::value;
    constexpr int SD = decltype(sd)::value;
    const int e = init_flag(finite_flag, as_stream(stream));
    if (e != 0) return e;
    AffineInv<XD, SD> fn{static_cast<st_t<XD>*>(y), static_cast<const st_t<SD>*>(scale),
                         static_cast<const st_t<SD>*>(shift)};
    if (check_finite && finite_flag != nullptr) {
      return launch<kFlag>(fn, n, as_stream(stream), finite_flag, nullptr, fn.y, fn.scale, fn.shift);
    }
    return launch<kNoReport>(fn, n, as_stream(stream), nullptr, nullptr, fn.y, fn.scale, fn.shift);
  });
}

int revengine_cuda_fixed_quantize(const void* x, int x_dtype, int64_t* q, int frac_bits, int64_t n, int64_t* status,
                                  void* stream) {
  if (!valid_frac_bits(frac_bits)) return static_cast<int>(cudaErrorInvalidValue);
  return dispatch1(x_dtype, [&](auto xd) {
    constexpr int XD = decltype(xd)::value;
    const int e = init_status(status, as_stream(stream));
    if (e != 0) return e;
    Quantize<XD> fn{static_cast<const st_t<XD>*>(x), q, std::ldexp(1.0, frac_bits)};
    return launch<kCount>(fn, n, as_stream(stream), nullptr, status, fn.x, fn.q);
  });
}

int revengine_cuda_fixed_dequantize(const int64_t* q, void* out, int out_dtype, int frac_bits, int64_t n,
                                    void* stream) {
  if (!valid_frac_bits(frac_bits)) return static_cast<int>(cudaErrorInvalidValue);
  return dispatch1(out_dtype, [&](auto od) {
    constexpr int OD = decltype(od)::value;
    Dequantize<OD> fn{q, static_cast<st_t<OD>*>(out), std::ldexp(1.0, -frac_bits)};
    return launch<kNoReport>(fn, n, as_stream(stream), nullptr, nullptr, fn.q, fn.out);
  });
}

int revengine_cuda_fixed_update_(int64_t* acc, const void* inc, int inc_dtype, int frac_bits, int64_t sign, int64_t n,
                                 int64_t* status, void* stream) {
  if (!valid_frac_bits(frac_bits) || (sign != 1 && sign != -1)) return static_cast<int>(cudaErrorInvalidValue);
  return dispatch1(inc_dtype, [&](auto xd) {
    constexpr int XD = decltype(xd)::value;
    const int e = init_status(status, as_stream(stream));
    if (e != 0) return e;
    FixedUpdate<XD> fn{acc, static_cast<const st_t<XD>*>(inc), std::ldexp(1.0, frac_bits), sign};
    return launch<kCount>(fn, n, as_stream(stream), nullptr, status, fn.acc, fn.inc);
  });
}

int revengine_cuda_bdia_step(int64_t* u, const int64_t* src, const void* inc, int inc_dtype, const int64_t* sign,
                             uint8_t* low, int64_t n, int64_t inner, int frac_bits, int shift, int forward,
                             int64_t* status, void* stream) {
  if (!valid_frac_bits(frac_bits) || shift < 1 || shift > 8 || (n > 0 && inner <= 0)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  return dispatch1(inc_dtype, [&](auto xd) {
    constexpr int XD = decltype(xd)::value;
    const int e = init_status(status, as_stream(stream));
    if (e != 0) return e;
    const int per = (shift < 8 && 8 % shift == 0) ? 8 / shift : 1;
    const int64_t nbytes = (n + per - 1) / per;
    const double g = std::ldexp(1.0, -shift);
    const double sp = std::ldexp(1.0 + g, frac_bits), sn = std::ldexp(1.0 - g, frac_bits);
    const auto* ip = static_cast<const st_t<XD>*>(inc);
    if (forward) {
      BdiaStep<XD, true> fn{u, src, ip, sign, low, n, inner, sp, sn, shift, per};
      return launch<kCount>(fn, nbytes, as_stream(stream), nullptr, status, fn.low);
    }
    BdiaStep<XD, false> fn{u, src, ip, sign, low, n, inner, sp, sn, shift, per};
    return launch<kCount>(fn, nbytes, as_stream(stream), nullptr, status, fn.low);
  });
}

int revengine_cuda_all_finite(const void* x, int x_dtype, int64_t n, uint8_t* finite_flag, void* stream) {
  if (finite_flag == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  return dispatch1(x_dtype, [&](auto xd) {
    constexpr int XD = decltype(xd)::value;
    const int e = init_flag(finite_flag, as_stream(stream));
    if (e != 0) return e;
    AllFinite<XD> fn{static_cast<const st_t<XD>*>(x)};
    return launch<kFlag>(fn, n, as_stream(stream), finite_flag, nullptr, fn.x);
  });
}

const char* revengine_cuda_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // extern "C"
