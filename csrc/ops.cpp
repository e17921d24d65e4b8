// Element-wise kernels of revengine (see ops.h): op schemas, CPU and Meta kernels, autograd.
//
// Arithmetic contract (the CUDA kernels must match it so results agree across devices):
//   opmath  = float for bfloat16/float16 x, else x's dtype; every operand is converted to opmath,
//             the result is rounded once to x's dtype.
//   coupling_update : r = fma(lam, x, f)          (lam converted to opmath first)
//   coupling_inverse: r = (y - f) / lam
//   affine_update   : r = fma(x, scale, shift)
//   affine_inverse  : r = (y - shift) / scale
//   fixed_quantize  : q = round_half_even(double(x) * 2^frac_bits)      (exact scaling in double)
//   fixed_update_   : acc += sign * round_half_even(double(inc) * 2^frac_bits)  (wrap-around int64)
//   fixed_dequantize: out = dtype(double(q) * 2^-frac_bits)   (double -> float -> bf16/half, as torch)
//   bdia_step_      : one exact BDIA layer (layers.cpp), per element i of sample b (dim 0), s = +-1
//                     the sign of sign[b] (negative: -1, else +1), k = shift, g = s 2^-k:
//                       q    = round_half_even(double(inc) * ((1 + g) 2^frac_bits))   (one rounding)
//                       low  = u & (2^k - 1), packed 8/k to a byte (k = 1, 2, 4; else one a byte)
//                       u   <- s (u >> k) + src - s (src >> k) + q                  (wrap-around)
//   bdia_unstep_    : its inverse, u <- ((s (u - q - src + s (src >> k))) << k) | low
// The "all finite" flags test the stored (rounded) results, so an overflow of the final
// rounding (e.g. to float16) is reported too. Operands (f, scale, shift) must have x's shape and
// device but may have any supported floating dtype (autocast); scale and shift may differ.
//
// CPU: at::parallel_for over contiguous chunks (grain 32768) of plain loops that GCC vectorises,
// built twice (x86-64-v3 and baseline) with target_clones; float16 operands are widened and
// narrowed in blocks with F16C when the CPU has it. Results do not depend on the thread count
// or on the clone picked. Non-contiguous x is handled through a contiguous copy written back.
//
// The file is also compiled into a plain C++ shared library: no pybind11 here.
#include "ops.h"
#include "ops_checks.h"

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <type_traits>

// Runtime ISA dispatch for the hot loops: an AVX2+FMA clone and a baseline clone, picked once
// by an ifunc resolver. Both give bit-identical results (fma is exact; nothing else is fused).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(REVENGINE_NO_TARGET_CLONES)
#define REVENGINE_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define REVENGINE_CLONES
#endif

// float16 <-> float block conversions with F16C, chosen at run time (see half_to_float_block).
#ifndef REVENGINE_X86_F16C
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define REVENGINE_X86_F16C 1
#else
#define REVENGINE_X86_F16C 0
#endif
#endif
#if REVENGINE_X86_F16C
#include <immintrin.h>
#endif

#if defined(__GNUC__) && !defined(__clang__)
#define REVENGINE_IVDEP _Pragma("GCC ivdep")
#elif defined(__clang__)
#define REVENGINE_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#else
#define REVENGINE_IVDEP
#endif

namespace revengine {
namespace {

constexpr int64_t kGrain = 32768;

// ---------------------------------------------------------------------------------------------
// Element traits: storage type, opmath type, load/store with round-to-nearest-even, and a
// branch-free "stored value is inf/nan" test on the bits (vectorises as integer ops).
// ---------------------------------------------------------------------------------------------
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  using storage = float;
  using op = float;
  static inline op load(storage v) { return v; }
  static inline storage store(float v) { return v; }
  static inline storage store_from_double(double v) { return static_cast<float>(v); }
  static inline uint32_t nonfinite(storage v) {
    uint32_t b;
    std::memcpy(&b, &v, sizeof(b));
    return (b & 0x7f800000u) == 0x7f800000u;
  }
};

template <>
struct Elem<double> {
  using storage = double;
  using op = double;
  static inline op load(storage v) { return v; }
  static inline storage store(double v) { return v; }
  static inline storage store_from_double(double v) { return v; }
  static inline uint32_t nonfinite(storage v) {
    uint64_t b;
    std::memcpy(&b, &v, sizeof(b));
    return (b & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
  }
};

template <>
struct Elem<c10::BFloat16> {
  using storage = uint16_t;
  using op = float;
  static inline op load(storage v) {
    uint32_t b = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &b, sizeof(f));
    return f;
  }
  // Same rounding as c10::BFloat16(float): round to nearest even, NaN -> 0x7FC0; branch-free.
  static inline storage store(float v) {
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const bool is_nan = (u & 0x7fffffffu) > 0x7f800000u;
    return static_cast<storage>(is_nan ? 0x7fc0u : rounded);
  }
  // torch converts double -> bfloat16 through float; so do we.
  static inline storage store_from_double(double v) { return store(static_cast<float>(v)); }
  static inline uint32_t nonfinite(storage v) { return (v & 0x7f80u) == 0x7f80u; }
};

inline uint32_t f32_bits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  return b;
}
inline float f32_from(uint32_t b) {
  float v;
  std::memcpy(&v, &b, sizeof(v));
  return v;
}
// All-ones when c, else zero: selects written as masks leave the compiler no branch to keep
// (it will not if-convert a branch holding floating-point work under -ftrapping-math).
inline uint32_t mask32(bool c) { return 0u - static_cast<uint32_t>(c); }
inline uint64_t mask64(bool c) { return 0ull - static_cast<uint64_t>(c); }
inline uint32_t sel32(bool c, uint32_t a, uint32_t b) { return (a & mask32(c)) | (b & ~mask32(c)); }
inline uint64_t sel64(bool c, uint64_t a, uint64_t b) { return (a & mask64(c)) | (b & ~mask64(c)); }

// IEEE half <-> float without branches (c10's versions have data-dependent control flow that
// GCC does not vectorise). Every path is computed and the result selected with integer ops.
// Same results as c10::Half: exact widening; narrowing rounds to nearest even, overflow -> inf,
// NaN -> 0x7E00 with the sign kept.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = static_cast<uint32_t>(h & 0x7fffu) << 13;  // exponent+mantissa, float position
  const uint32_t exp = em & 0x0f800000u;
  const uint32_t normal = em + ((127u - 15u) << 23);
  const uint32_t infnan = normal + ((128u - 16u) << 23);
  // subnormal (or zero): renormalise through one exact float subtraction
  const uint32_t sub = f32_bits(f32_from(normal + (1u << 23)) - f32_from(113u << 23));
  const uint32_t mag = sel32(exp == 0x0f800000u, infnan, sel32(exp == 0, sub, normal));
  return f32_from(mag | sign);
}

inline uint16_t float_to_half(float v) {
  const uint32_t b = f32_bits(v);
  const uint32_t sign = b & 0x80000000u;
  const uint32_t u = b ^ sign;
  // overflow / inf / nan
  const uint32_t big = sel32(u > 0x7f800000u, 0x7e00u, 0x7c00u);
  // results that are half subnormals or zero: let the float adder round (exact RNE)
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  const uint32_t small = f32_bits(f32_from(u) + f32_from(denorm_magic)) - denorm_magic;
  // normal results: rebias and round to nearest even on the 13 dropped bits
  const uint32_t mant_odd = (u >> 13) & 1u;
  const uint32_t normal = (u + (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + mant_odd) >> 13;
  const uint32_t mag = sel32(u >= ((127u + 16u) << 23), big, sel32(u < (113u << 23), small, normal));
  return static_cast<uint16_t>(mag | (sign >> 16));
}

template <>
struct Elem<c10::Half> {
  using storage = uint16_t;
  using op = float;
  static inline op load(storage v) { return half_to_float(v); }
  static inline storage store(float v) { return float_to_half(v); }
  static inline storage store_from_double(double v) { return store(static_cast<float>(v)); }
  static inline uint32_t nonfinite(storage v) { return (v & 0x7c00u) == 0x7c00u; }
};

template <typename T>
using storage_t = typename Elem<T>::storage;
template <typename T>
using opmath_t = typename Elem<T>::op;

template <typename T>
inline storage_t<T>* ptr(const at::Tensor& t) {
  return reinterpret_cast<storage_t<T>*>(t.data_ptr());
}
template <typename T>
inline const storage_t<T>* cptr(const at::Tensor& t) {
  return reinterpret_cast<const storage_t<T>*>(t.const_data_ptr());
}

// round_half_even(v) as int64 for a finite double with |v| < 2^62, in integer and exact
// floating-point operations only (AVX2 has no double -> int64 conversion; this vectorises).
//   |v| <  2^52: |v| + 2^52 lies in [2^52, 2^53] where the spacing is 1, so the adder rounds to
//                nearest even and the bit pattern minus that of 2^52 is the integer;
//   |v| >= 2^52: v is an integer: mantissa << (exponent - 52).
inline int64_t rne_to_int64(double v) {
  uint64_t b;
  std::memcpy(&b, &v, sizeof(b));
  const uint64_t neg = b >> 63;
  const uint64_t abits = b & 0x7fffffffffffffffull;
  constexpr uint64_t two52_bits = static_cast<uint64_t>(1023 + 52) << 52;
  double a;
  std::memcpy(&a, &abits, sizeof(a));
  const double t = a + 4503599627370496.0;  // + 2^52
  uint64_t tb;
  std::memcpy(&tb, &t, sizeof(tb));
  const uint64_t small = tb - two52_bits;
  const uint64_t shift = ((abits >> 52) - (1023 + 52)) & 63u;
  const uint64_t large = ((abits & 0x000fffffffffffffull) | (1ull << 52)) << shift;
  const uint64_t mag = sel64(abits < two52_bits, small, large);
  return static_cast<int64_t>((mag ^ (0 - neg)) + neg);
}

// double(q), correctly rounded like a cvtsi2sd, from exact floating-point pieces (vectorises;
// AVX2 has no int64 -> double conversion):  (2^84 + (hi + 2^31) 2^32) - (2^84 + 2^63 + 2^52)
// = hi 2^32 - 2^52 exactly, plus (2^52 + lo) gives hi 2^32 + lo = q with a single rounding.
inline double int64_to_double(int64_t q) {
  const uint64_t u = static_cast<uint64_t>(q);
  const uint64_t lo_bits = (u & 0xffffffffull) | 0x4330000000000000ull;  // 2^52 + lo
  const uint64_t hi_bits = (u >> 32) ^ 0x4530000080000000ull;            // 2^84 + (hi + 2^31) 2^32
  const uint64_t magic_bits = 0x4530000080100000ull;                       // 2^84 + 2^63 + 2^52
  double lo, hi, magic;
  std::memcpy(&lo, &lo_bits, sizeof(lo));
  std::memcpy(&hi, &hi_bits, sizeof(hi));
  std::memcpy(&magic, &magic_bits, sizeof(magic));
  return (hi - magic) + lo;
}

// 0.0 where c, else v (bitwise select).
inline double zero_if(uint32_t c, double v) {
  uint64_t b;
  std::memcpy(&b, &v, sizeof(b));
  b &= ~mask64(c != 0);
  std::memcpy(&v, &b, sizeof(v));
  return v;
}

// |v| >= 2^62, inf or nan, decided on the exponent bits.
inline uint32_t out_of_fixed_range(double v) {
  uint64_t b;
  std::memcpy(&b, &v, sizeof(b));
  return (b & 0x7ff0000000000000ull) >= (static_cast<uint64_t>(1023 + 62) << 52);
}

// ---------------------------------------------------------------------------------------------
// Chunk kernels (one contiguous chunk each; called from at::parallel_for).
// Aliasing: `out` may equal `x` and a secondary operand may equal the primary one element for
// element (same-index aliasing only; partial overlap is removed by the caller), hence ivdep.
// ---------------------------------------------------------------------------------------------
template <typename XT, typename FT>
REVENGINE_CLONES void coupling_fwd_chunk(storage_t<XT>* out, const storage_t<XT>* x,
                                         const storage_t<FT>* f, opmath_t<XT> lam, int64_t n) {
  using op = opmath_t<XT>;
  REVENGINE_IVDEP
  for (int64_t i = 0; i < n; ++i) {
    const op r = std::fma(lam, Elem<XT>::load(x[i]), static_cast<op>(Elem<FT>::load(f[i])));
    out[i] = Elem<XT>::store(r);
  }
}

// Returns non-zero when some stored result is not finite.
template <typename XT, typename FT>
REVENGINE_CLONES uint32_t coupling_inv_chunk(storage_t<XT>* y, const storage_t<FT>* f,
                                             opmath_t<XT> lam, int64_t n) {
  using op = opmath_t<XT>;
  uint32_t bad = 0;
  REVENGINE_IVDEP
  for (int64_t i = 0; i < n; ++i) {
    const op r = (Elem<XT>::load(y[i]) - static_cast<op>(Elem<FT>::load(f[i]))) / lam;
    const storage_t<XT> s = Elem<XT>::store(r);
    y[i] = s;
    bad |= Elem<XT>::nonfinite(s);
  }
  return bad;
}

template <typename XT, typename ST>
REVENGINE_CLONES void affine_fwd_chunk(storage_t<XT>* x, const storage_t<ST>* scale,
                                       const storage_t<ST>* shift, int64_t n) {
  using op = opmath_t<XT>;
  REVENGINE_IVDEP
  for (int64_t i = 0; i < n; ++i) {
    const op r = std::fma(Elem<XT>::load(x[i]), static_cast<op>(Elem<ST>::load(scale[i])),
                          static_cast<op>(Elem<ST>::load(shift[i])));
    x[i] = Elem<XT>::store(r);
  }
}

template <typename XT, typename ST>
REVENGINE_CLONES uint32_t affine_inv_chunk(storage_t<XT>* y, const storage_t<ST>* scale,
                                           const storage_t<ST>* shift, int64_t n) {
  using op = opmath_t<XT>;
  uint32_t bad = 0;
  REVENGINE_IVDEP
  for (int64_t i = 0; i < n; ++i) {
    const op r = (Elem<XT>::load(y[i]) - static_cast<op>(Elem<ST>::load(shift[i]))) /
                 static_cast<op>(Elem<ST>::load(scale[i]));
    const storage_t<XT> s = Elem<XT>::store(r);
    y[i] = s;
    bad |= Elem<XT>::nonfinite(s);
  }
  return bad;
}

template <typename XT>
REVENGINE_CLONES uint32_t all_finite_chunk(const storage_t<XT>* x, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= Elem<XT>::nonfinite(x[i]);
  return bad;
}

// Returns the number of bad (non-finite or out of range) elements; they are stored as 0.
template <typename XT>
REVENGINE_CLONES int64_t quantize_chunk(const storage_t<XT>* x, int64_t* q, double scale, int64_t n) {
  int64_t bad = 0;
  REVENGINE_IVDEP
  for (int64_t i = 0; i < n; ++i) {
    const double v = static_cast<double>(Elem<XT>::load(x[i])) * scale;
    const uint32_t b = out_of_fixed_range(v);
    bad += b;
    q[i] = rne_to_int64(zero_if(b, v));
  }
  return bad;
}

// acc += sign * q (two's complement wrap-around); bad increments add nothing.
template <typename XT>
REVENGINE_CLONES int64_t fixed_update_chunk(int64_t* acc, const storage_t<XT>* inc, double scale,
                                            int64_t sign, int64_t n) {
  int64_t bad = 0;
  REVENGINE_IVDEP
  for (int64_t i = 0; i < n; ++i) {
    const double v = static_cast<double>(Elem<XT>::load(inc[i])) * scale;
    const uint32_t b = out_of_fixed_range(v);
    bad += b;
    const int64_t q = rne_to_int64(zero_if(b, v));
    acc[i] = static_cast<int64_t>(static_cast<uint64_t>(acc[i]) + static_cast<uint64_t>(sign * q));
  }
  return bad;
}

template <typename OT>
REVENGINE_CLONES void dequantize_chunk(const int64_t* q, storage_t<OT>* out, double scale, int64_t n) {
  REVENGINE_IVDEP
  for (int64_t i = 0; i < n; ++i) out[i] = Elem<OT>::store_from_double(int64_to_double(q[i]) * scale);
}

// BDIA's exact step (forward) or its inverse over bytes [j0, j1) of `low`, i.e. elements
// [j0 per, min(j1 per, n)); elements of sample b are [b inner, (b + 1) inner). Returns the number
// of bad increments (non-finite or out of range), which add 0, so the other direction undoes a
// call exactly. Every operand of an element is read before u is written (src may be u).
template <typename XT, bool kForward>
int64_t bdia_chunk(int64_t* u, const int64_t* src, const storage_t<XT>* inc, const int64_t* sign, uint8_t* low,
                   const uint8_t* low_in, int64_t inner, const double* scale, int k, int per, int64_t n, int64_t j0,
                   int64_t j1) {
  const uint64_t mask = (uint64_t{1} << k) - 1;
  int64_t bad = 0;
  int64_t i = j0 * per;
  const int64_t end = std::min(j1 * per, n);
  int64_t b = i / inner, next = (b + 1) * inner;
  for (int64_t j = j0; i < end; ++j) {
    uint32_t byte = kForward ? 0u : low_in[j];
    for (int e = 0; e < per && i < end; ++e, ++i) {
      if (i == next) {
        ++b;
        next += inner;
      }
      const bool neg = sign[b] < 0;
      const double v = static_cast<double>(Elem<XT>::load(inc[i])) * scale[neg];
      const uint32_t bi = out_of_fixed_range(v);
      bad += bi;
      const uint64_t q = static_cast<uint64_t>(rne_to_int64(zero_if(bi, v)));
      const int64_t t = src[i];
      const uint64_t th = static_cast<uint64_t>(t >> k);  // arithmetic shift: floor(t / 2^k)
      const uint64_t sth = neg ? 0 - th : th;
      if constexpr (kForward) {
        const int64_t p = u[i];
        byte |= static_cast<uint32_t>(static_cast<uint64_t>(p) & mask) << (e * k);
        const uint64_t h = static_cast<uint64_t>(p >> k);
        u[i] = static_cast<int64_t>((neg ? 0 - h : h) + static_cast<uint64_t>(t) - sth + q);
      } else {
        const uint64_t sh = static_cast<uint64_t>(u[i]) - q - static_cast<uint64_t>(t) + sth;  // s (p >> k)
        const uint64_t h = neg ? 0 - sh : sh;
        u[i] = static_cast<int64_t>((h << k) | ((byte >> (e * k)) & mask));
      }
    }
    if constexpr (kForward) low[j] = static_cast<uint8_t>(byte);
  }
  return bad;
}

// ---------------------------------------------------------------------------------------------
// float16 staging. GCC does not vectorise float16 conversions well (the branch-free bit
// versions above cost ~4 cycles an element), so kernels with float16 operands run the float
// kernel on blocks converted with F16C when the CPU has it. Same arithmetic as a direct float16
// kernel: the opmath type is float, inputs widen exactly, the result is rounded once to float16.
// ---------------------------------------------------------------------------------------------
template <typename T>
constexpr bool is_half_v = std::is_same_v<T, c10::Half>;
template <typename T>
using kern_t = std::conditional_t<is_half_v<T>, float, T>;  // element type the chunk kernels see

constexpr int64_t kBlock = 1024;

REVENGINE_CLONES void half_to_float_soft(const uint16_t* h, float* f, int64_t n) {
  for (int64_t i = 0; i < n; ++i) f[i] = half_to_float(h[i]);
}

REVENGINE_CLONES uint32_t float_to_half_soft(const float* f, uint16_t* h, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t v = float_to_half(f[i]);
    h[i] = v;
    bad |= Elem<c10::Half>::nonfinite(v);
  }
  return bad;
}

#if REVENGINE_X86_F16C
__attribute__((target("avx,f16c"))) void half_to_float_f16c(const uint16_t* h, float* f, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  }
  for (; i < n; ++i) f[i] = _cvtsh_ss(h[i]);
}

__attribute__((target("avx,f16c"))) uint32_t float_to_half_f16c(const float* f, uint16_t* h, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(h + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(f + i), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) h[i] = _cvtss_sh(f[i], _MM_FROUND_TO_NEAREST_INT);
  uint32_t bad = 0;
  for (i = 0; i < n; ++i) bad |= Elem<c10::Half>::nonfinite(h[i]);
  return bad;
}

bool cpu_has_f16c() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  }();
  return has;
}
#endif

inline void half_to_float_block(const uint16_t* h, float* f, int64_t n) {
#if REVENGINE_X86_F16C
  if (cpu_has_f16c()) return half_to_float_f16c(h, f, n);
#endif
  half_to_float_soft(h, f, n);
}

// Returns non-zero when some float16 result is inf or nan.
inline uint32_t float_to_half_block(const float* f, uint16_t* h, int64_t n) {
#if REVENGINE_X86_F16C
  if (cpu_has_f16c()) return float_to_half_f16c(f, h, n);
#endif
  return float_to_half_soft(f, h, n);
}

// Elements [s, s + m) of p as the chunk kernels read them: p itself, or float16 widened into buf.
template <typename T>
inline const storage_t<kern_t<T>>* stage_in(const storage_t<T>* p, int64_t s, int64_t m, float* buf) {
  if constexpr (is_half_v<T>) {
    half_to_float_block(p + s, buf, m);
    return buf;
  } else {
    return p + s;
  }
}

// Range functions: what the parallel_for bodies call. Without float16 they are the chunk kernels.
template <typename XT, typename FT>
void coupling_fwd_range(storage_t<XT>* out, const storage_t<XT>* x, const storage_t<FT>* f, opmath_t<XT> lam,
                        int64_t n) {
  if constexpr (!is_half_v<XT> && !is_half_v<FT>) {
    coupling_fwd_chunk<XT, FT>(out, x, f, lam, n);
  } else {
    float xb[kBlock], fb[kBlock];
    for (int64_t s = 0; s < n; s += kBlock) {
      const int64_t m = std::min(kBlock, n - s);
      const auto* xs = stage_in<XT>(x, s, m, xb);
      const auto* fs = stage_in<FT>(f, s, m, fb);  // both read before anything is written
      if constexpr (is_half_v<XT>) {
        coupling_fwd_chunk<float, kern_t<FT>>(xb, xs, fs, lam, m);
        float_to_half_block(xb, out + s, m);
      } else {
        coupling_fwd_chunk<XT, kern_t<FT>>(out + s, xs, fs, lam, m);
      }
    }
  }
}

template <typename XT, typename FT>
uint32_t coupling_inv_range(storage_t<XT>* y, const storage_t<FT>* f, opmath_t<XT> lam, int64_t n) {
  if constexpr (!is_half_v<XT> && !is_half_v<FT>) {
    return coupling_inv_chunk<XT, FT>(y, f, lam, n);
  } else {
    uint32_t bad = 0;
    float yb[kBlock], fb[kBlock];
    for (int64_t s = 0; s < n; s += kBlock) {
      const int64_t m = std::min(kBlock, n - s);
      if constexpr (is_half_v<XT>) {
        half_to_float_block(y + s, yb, m);
        const auto* fs = stage_in<FT>(f, s, m, fb);
        coupling_inv_chunk<float, kern_t<FT>>(yb, fs, lam, m);  // its flag is for float results
        bad |= float_to_half_block(yb, y + s, m);
      } else {
        bad |= coupling_inv_chunk<XT, kern_t<FT>>(y + s, stage_in<FT>(f, s, m, fb), lam, m);
      }
    }
    return bad;
  }
}

template <typename XT, typename ST>
void affine_fwd_range(storage_t<XT>* x, const storage_t<ST>* scale, const storage_t<ST>* shift, int64_t n) {
  if constexpr (!is_half_v<XT> && !is_half_v<ST>) {
    affine_fwd_chunk<XT, ST>(x, scale, shift, n);
  } else {
    float xb[kBlock], sb[kBlock], hb[kBlock];
    for (int64_t s = 0; s < n; s += kBlock) {
      const int64_t m = std::min(kBlock, n - s);
      const auto* ss = stage_in<ST>(scale, s, m, sb);
      const auto* hs = stage_in<ST>(shift, s, m, hb);
      if constexpr (is_half_v<XT>) {
        half_to_float_block(x + s, xb, m);
        affine_fwd_chunk<float, kern_t<ST>>(xb, ss, hs, m);
        float_to_half_block(xb, x + s, m);
      } else {
        affine_fwd_chunk<XT, kern_t<ST>>(x + s, ss, hs, m);
      }
    }
  }
}

template <typename XT, typename ST>
uint32_t affine_inv_range(storage_t<XT>* y, const storage_t<ST>* scale, const storage_t<ST>* shift, int64_t n) {
  if constexpr (!is_half_v<XT> && !is_half_v<ST>) {
    return affine_inv_chunk<XT, ST>(y, scale, shift, n);
  } else {
    uint32_t bad = 0;
    float yb[kBlock], sb[kBlock], hb[kBlock];
    for (int64_t s = 0; s < n; s += kBlock) {
      const int64_t m = std::min(kBlock, n - s);
      const auto* ss = stage_in<ST>(scale, s, m, sb);
      const auto* hs = stage_in<ST>(shift, s, m, hb);
      if constexpr (is_half_v<XT>) {
        half_to_float_block(y + s, yb, m);
        affine_inv_chunk<float, kern_t<ST>>(yb, ss, hs, m);
        bad |= float_to_half_block(yb, y + s, m);
      } else {
        bad |= affine_inv_chunk<XT, kern_t<ST>>(y + s, ss, hs, m);
      }
    }
    return bad;
  }
}

template <typename XT>
int64_t quantize_range(const storage_t<XT>* x, int64_t* q, double scale, int64_t n) {
  if constexpr (!is_half_v<XT>) {
    return quantize_chunk<XT>(x, q, scale, n);
  } else {
    int64_t bad = 0;
    float xb[kBlock];
    for (int64_t s = 0; s < n; s += kBlock) {
      const int64_t m = std::min(kBlock, n - s);
      bad += quantize_chunk<float>(stage_in<XT>(x, s, m, xb), q + s, scale, m);
    }
    return bad;
  }
}

template <typename XT>
int64_t fixed_update_range(int64_t* acc, const storage_t<XT>* inc, double scale, int64_t sign, int64_t n) {
  if constexpr (!is_half_v<XT>) {
    return fixed_update_chunk<XT>(acc, inc, scale, sign, n);
  } else {
    int64_t bad = 0;
    float ib[kBlock];
    for (int64_t s = 0; s < n; s += kBlock) {
      const int64_t m = std::min(kBlock, n - s);
      bad += fixed_update_chunk<float>(acc + s, stage_in<XT>(inc, s, m, ib), scale, sign, m);
    }
    return bad;
  }
}

template <typename OT>
void dequantize_range(const int64_t* q, storage_t<OT>* out, double scale, int64_t n) {
  if constexpr (!is_half_v<OT>) {
    dequantize_chunk<OT>(q, out, scale, n);
  } else {
    // double -> float -> float16, as torch converts
    float ob[kBlock];
    for (int64_t s = 0; s < n; s += kBlock) {
      const int64_t m = std::min(kBlock, n - s);
      dequantize_chunk<float>(q + s, ob, scale, m);
      float_to_half_block(ob, out + s, m);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Argument checks (shared by the CPU and Meta kernels and the CUDA glue) and the layout helpers
// operand_for, inplace_contiguous, as_kernel_operand, affine_operands, bool_scalar: ops_checks.h.
// ---------------------------------------------------------------------------------------------
using namespace ::revengine::detail;

// ---------------------------------------------------------------------------------------------
// CPU helpers
// ---------------------------------------------------------------------------------------------

// Calls body(XT{}, FT{}) for the (x dtype, operand dtype) pairs of has_pair_kernel.
template <typename Body>
void dispatch_pair(at::ScalarType xt, at::ScalarType ft, Body&& body) {
  using BF = c10::BFloat16;
  using H = c10::Half;
  switch (xt) {
    case at::kFloat:
      if (ft == at::kFloat) return body(float{}, float{});
      if (ft == at::kBFloat16) return body(float{}, BF{});
      if (ft == at::kHalf) return body(float{}, H{});
      break;
    case at::kDouble:
      if (ft == at::kDouble) return body(double{}, double{});
      break;
    case at::kBFloat16:
      if (ft == at::kBFloat16) return body(BF{}, BF{});
      if (ft == at::kFloat) return body(BF{}, float{});
      break;
    case at::kHalf:
      if (ft == at::kHalf) return body(H{}, H{});
      if (ft == at::kFloat) return body(H{}, float{});
      break;
    default:
      break;
  }
  TORCH_INTERNAL_ASSERT(false, "revengine: no kernel for x of dtype ", xt, " with an operand of dtype ", ft);
}

// ---------------------------------------------------------------------------------------------
// CPU kernels
// ---------------------------------------------------------------------------------------------
at::Tensor coupling_update_cpu(const at::Tensor& x, const at::Tensor& f, double lam) {
  check_coupling("coupling_update", x, f);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const at::Tensor fc = as_kernel_operand(x.scalar_type(), f).contiguous();  // out is fresh: no overlap
  const int64_t n = xc.numel();
  dispatch_pair(x.scalar_type(), fc.scalar_type(), [&](auto xtag, auto ftag) {
    using XT = decltype(xtag);
    using FT = decltype(ftag);
    const auto l = static_cast<opmath_t<XT>>(lam);
    auto* o = ptr<XT>(out);
    const auto* xp = cptr<XT>(xc);
    const auto* fp = cptr<FT>(fc);
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
      coupling_fwd_range<XT, FT>(o + b, xp + b, fp + b, l, e - b);
    });
  });
  return out;
}

void coupling_update__cpu(at::Tensor& x, const at::Tensor& f, double lam) {
  check_coupling("coupling_update_", x, f);
  inplace_contiguous(x, [&](at::Tensor& xc) {
    const at::Tensor fc = operand_for(xc, as_kernel_operand(xc.scalar_type(), f));
    const int64_t n = xc.numel();
    dispatch_pair(xc.scalar_type(), fc.scalar_type(), [&](auto xtag, auto ftag) {
      using XT = decltype(xtag);
      using FT = decltype(ftag);
      const auto l = static_cast<opmath_t<XT>>(lam);
      auto* xp = ptr<XT>(xc);
      const auto* fp = cptr<FT>(fc);
      at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
        coupling_fwd_range<XT, FT>(xp + b, xp + b, fp + b, l, e - b);
      });
    });
    return true;
  });
}

at::Tensor coupling_inverse__cpu(at::Tensor& y, const at::Tensor& f, double lam, bool check_finite) {
  check_coupling("coupling_inverse_", y, f);
  check_lam_inverse("coupling_inverse_", lam, y.scalar_type());
  std::atomic<bool> bad{false};
  inplace_contiguous(y, [&](at::Tensor& yc) {
    const at::Tensor fc = operand_for(yc, as_kernel_operand(yc.scalar_type(), f));
    const int64_t n = yc.numel();
    dispatch_pair(yc.scalar_type(), fc.scalar_type(), [&](auto xtag, auto ftag) {
      using XT = decltype(xtag);
      using FT = decltype(ftag);
      const auto l = static_cast<opmath_t<XT>>(lam);
      auto* yp = ptr<XT>(yc);
      const auto* fp = cptr<FT>(fc);
      at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
        // The finite test is fused into the pass (nearly free: the loop is memory bound).
        if (coupling_inv_range<XT, FT>(yp + b, fp + b, l, e - b)) bad.store(true, std::memory_order_relaxed);
      });
    });
    return true;
  });
  return bool_scalar(!check_finite || !bad.load(), y);
}

void affine_update__cpu(at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift) {
  check_affine("affine_update_", x, scale, shift);
  const auto ops_ = affine_operands(x.scalar_type(), scale, shift);
  inplace_contiguous(x, [&](at::Tensor& xc) {
    const at::Tensor sc = operand_for(xc, ops_.first);
    const at::Tensor sh = operand_for(xc, ops_.second);
    const int64_t n = xc.numel();
    dispatch_pair(xc.scalar_type(), sc.scalar_type(), [&](auto xtag, auto stag) {
      using XT = decltype(xtag);
      using ST = decltype(stag);
      auto* xp = ptr<XT>(xc);
      const auto* sp = cptr<ST>(sc);
      const auto* hp = cptr<ST>(sh);
      at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
        affine_fwd_range<XT, ST>(xp + b, sp + b, hp + b, e - b);
      });
    });
    return true;
  });
}

at::Tensor affine_inverse__cpu(at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift, bool check_finite) {
  check_affine("affine_inverse_", y, scale, shift);
  const auto ops_ = affine_operands(y.scalar_type(), scale, shift);
  std::atomic<bool> bad{false};
  inplace_contiguous(y, [&](at::Tensor& yc) {
    const at::Tensor sc = operand_for(yc, ops_.first);
    const at::Tensor sh = operand_for(yc, ops_.second);
    const int64_t n = yc.numel();
    dispatch_pair(yc.scalar_type(), sc.scalar_type(), [&](auto xtag, auto stag) {
      using XT = decltype(xtag);
      using ST = decltype(stag);
      auto* yp = ptr<XT>(yc);
      const auto* sp = cptr<ST>(sc);
      const auto* hp = cptr<ST>(sh);
      at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
        if (affine_inv_range<XT, ST>(yp + b, sp + b, hp + b, e - b)) bad.store(true, std::memory_order_relaxed);
      });
    });
    return true;
  });
  return bool_scalar(!check_finite || !bad.load(), y);
}

// Error path only: index and value of the first element whose scaled value is not
// representable; builds the message.
template <typename XT>
std::string fixed_range_message(const char* op, const char* name, const at::Tensor& xc, int64_t nbad,
                                int64_t frac_bits, double scale) {
  const auto* xp = cptr<XT>(xc);
  const int64_t n = xc.numel();
  int64_t first = -1;
  for (int64_t i = 0; i < n; ++i) {
    if (out_of_fixed_range(static_cast<double>(Elem<XT>::load(xp[i])) * scale)) {
      first = i;
      break;
    }
  }
  const double value = first >= 0 ? static_cast<double>(Elem<XT>::load(xp[first])) : 0.0;
  return fixed_range_error(op, name, n, nbad, frac_bits, first, value);
}

at::Tensor fixed_quantize_cpu(const at::Tensor& x, int64_t frac_bits) {
  check_float("fixed_quantize", "x", x);
  check_frac_bits("fixed_quantize", frac_bits);
  const at::Tensor xc = x.contiguous();
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kLong).memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = xc.numel();
  const double scale = std::ldexp(1.0, static_cast<int>(frac_bits));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "revengine::fixed_quantize", [&] {
    using XT = scalar_t;
    const auto* xp = cptr<XT>(xc);
    int64_t* qp = q.data_ptr<int64_t>();
    std::atomic<int64_t> nbad{0};
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
      const int64_t c = quantize_range<XT>(xp + b, qp + b, scale, e - b);
      if (c) nbad.fetch_add(c, std::memory_order_relaxed);
    });
    const int64_t total = nbad.load();
    if (total) TORCH_CHECK(false, fixed_range_message<XT>("fixed_quantize", "x", xc, total, frac_bits, scale));
  });
  return q;
}

at::Tensor fixed_dequantize_cpu(const at::Tensor& q, int64_t frac_bits, at::ScalarType dtype) {
  check_dequantize(q, frac_bits, dtype);
  const at::Tensor qc = q.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(dtype).memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = qc.numel();
  const double scale = std::ldexp(1.0, -static_cast<int>(frac_bits));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "revengine::fixed_dequantize", [&] {
    using OT = scalar_t;
    const int64_t* qp = qc.const_data_ptr<int64_t>();
    auto* outp = ptr<OT>(out);
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
      dequantize_range<OT>(qp + b, outp + b, scale, e - b);
    });
  });
  return out;
}

void fixed_update__cpu(at::Tensor& acc, const at::Tensor& inc, int64_t frac_bits, int64_t sign) {
  check_fixed_update(acc, inc, frac_bits, sign);
  const double scale = std::ldexp(1.0, static_cast<int>(frac_bits));
  inplace_contiguous(acc, [&](at::Tensor& ac) {
    const at::Tensor ic = operand_for(ac, inc);
    const int64_t n = ac.numel();
    bool ok = true;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ic.scalar_type(), "revengine::fixed_update_", [&] {
      using XT = scalar_t;
      int64_t* ap = ac.data_ptr<int64_t>();
      const auto* ip = cptr<XT>(ic);
      std::atomic<int64_t> nbad{0};
      at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
        const int64_t c = fixed_update_range<XT>(ap + b, ip + b, scale, sign, e - b);
        if (c) nbad.fetch_add(c, std::memory_order_relaxed);
      });
      const int64_t total = nbad.load();
      if (total) {
        ok = false;
        // Undo the good increments (bad ones added 0) so that acc is left unchanged. Wrap-around
        // integer arithmetic makes this exact. A contiguous copy is simply dropped instead.
        if (ac.is_same(acc)) {
          at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
            fixed_update_range<XT>(ap + b, ip + b, scale, -sign, e - b);
          });
        }
        TORCH_CHECK(false, fixed_range_message<XT>("fixed_update_", "inc", ic, total, frac_bits, scale),
                    " (acc was left unchanged)");
      }
    });
    return ok;
  });
}

// One direction of BDIA's exact step on the CPU (see bdia_chunk); `low` is written (forward)
// or read (inverse). A bad increment is an error that leaves u unchanged.
template <bool kForward>
void bdia_cpu(const char* op, at::Tensor& u, const at::Tensor& src, const at::Tensor& inc, const at::Tensor& sign,
              const at::Tensor& low, int64_t frac_bits, int64_t shift) {
  const int64_t n = u.numel();
  if (n == 0) return;
  const int k = static_cast<int>(shift), per = static_cast<int>(bdia_per_byte(shift));
  const int64_t inner = n / u.size(0), nbytes = (n + per - 1) / per;
  const auto scales = bdia_scales(frac_bits, shift);
  const double scale[2] = {scales.first, scales.second};  // indexed by "sign < 0"
  const at::Tensor sg = sign.contiguous();
  const at::Tensor lowc = low.contiguous();
  inplace_contiguous(u, [&](at::Tensor& uc) {
    const at::Tensor sc = operand_for(uc, src);
    const at::Tensor ic = operand_for(uc, inc);
    bool ok = true;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ic.scalar_type(), "revengine::bdia_step_", [&] {
      using XT = scalar_t;
      int64_t* up = uc.data_ptr<int64_t>();
      const int64_t* sp = sc.const_data_ptr<int64_t>();
      const auto* ip = cptr<XT>(ic);
      const int64_t* gp = sg.const_data_ptr<int64_t>();
      uint8_t* lp = kForward ? lowc.data_ptr<uint8_t>() : nullptr;
      const uint8_t* li = lowc.const_data_ptr<uint8_t>();
      std::atomic<int64_t> nbad{0};
      at::parallel_for(0, nbytes, std::max<int64_t>(1, kGrain / per), [&](int64_t b, int64_t e) {
        const int64_t c = bdia_chunk<XT, kForward>(up, sp, ip, gp, lp, li, inner, scale, k, per, n, b, e);
        if (c) nbad.fetch_add(c, std::memory_order_relaxed);
      });
      if (nbad.load() == 0) return;
      ok = false;
      // Undo (bad increments added 0, so the other direction is exact). A contiguous copy is
      // simply dropped instead. Undoing an inverse rewrites the bytes it read: into a scratch copy.
      if (uc.is_same(u)) {
        const at::Tensor scratch = kForward ? at::Tensor() : lowc.clone();
        at::parallel_for(0, nbytes, std::max<int64_t>(1, kGrain / per), [&](int64_t b, int64_t e) {
          bdia_chunk<XT, !kForward>(up, sp, ip, gp, kForward ? nullptr : scratch.data_ptr<uint8_t>(), li, inner,
                                    scale, k, per, n, b, e);
        });
      }
      TORCH_CHECK(false, bdia_range_error(op, ic, sg, frac_bits, shift), " (u was left unchanged)");
    });
    return ok;
  });
}

at::Tensor bdia_step__cpu(at::Tensor& u, const at::Tensor& src, const at::Tensor& inc, const at::Tensor& sign,
                          int64_t frac_bits, int64_t shift) {
  check_bdia("bdia_step_", u, src, inc, sign, frac_bits, shift);
  at::Tensor low = empty_bdia_low(u, shift);
  bdia_cpu<true>("bdia_step_", u, src, inc, sign, low, frac_bits, shift);
  return low;
}

void bdia_unstep__cpu(at::Tensor& u, const at::Tensor& src, const at::Tensor& inc, const at::Tensor& sign,
                      const at::Tensor& low, int64_t frac_bits, int64_t shift) {
  check_bdia("bdia_unstep_", u, src, inc, sign, frac_bits, shift);
  check_bdia_low("bdia_unstep_", u, low, shift);
  bdia_cpu<false>("bdia_unstep_", u, src, inc, sign, low, frac_bits, shift);
}

at::Tensor all_finite_cpu(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.defined(), "revengine::all_finite: x is an undefined tensor");
  at::Tensor x = x_in;
  if (x.is_complex()) x = at::view_as_real(x.resolve_conj());
  if (!x.is_floating_point()) return bool_scalar(true, x_in);  // integers and bools are always finite
  TORCH_CHECK(is_supported_float(x.scalar_type()),
              "revengine::all_finite: unsupported dtype ", x.scalar_type());
  const at::Tensor xc = x.contiguous();
  const int64_t n = xc.numel();
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "revengine::all_finite", [&] {
    using XT = scalar_t;
    const auto* xp = cptr<XT>(xc);
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
      if (bad.load(std::memory_order_relaxed)) return;
      if (all_finite_chunk<XT>(xp + b, e - b)) bad.store(true, std::memory_order_relaxed);
    });
  });
  return bool_scalar(!bad.load(), x_in);
}

// ---------------------------------------------------------------------------------------------
// Meta kernels (also used by FakeTensor / torch.compile; symbolic-shape safe)
// ---------------------------------------------------------------------------------------------
at::Tensor meta_flag(const at::Tensor& like) {
  return at::empty({}, like.options().dtype(at::kBool));
}

at::Tensor coupling_update_meta(const at::Tensor& x, const at::Tensor& f, double /*lam*/) {
  check_coupling("coupling_update", x, f);
  return at::empty_symint(x.sym_sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
}

void coupling_update__meta(at::Tensor& x, const at::Tensor& f, double /*lam*/) {
  check_coupling("coupling_update_", x, f);
}

at::Tensor coupling_inverse__meta(at::Tensor& y, const at::Tensor& f, double lam, bool /*check_finite*/) {
  check_coupling("coupling_inverse_", y, f);
  check_lam_inverse("coupling_inverse_", lam, y.scalar_type());
  return meta_flag(y);
}

void affine_update__meta(at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift) {
  check_affine("affine_update_", x, scale, shift);
}

at::Tensor affine_inverse__meta(at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift, bool /*check*/) {
  check_affine("affine_inverse_", y, scale, shift);
  return meta_flag(y);
}

at::Tensor fixed_quantize_meta(const at::Tensor& x, int64_t frac_bits) {
  check_float("fixed_quantize", "x", x);
  check_frac_bits("fixed_quantize", frac_bits);
  return at::empty_symint(x.sym_sizes(), x.options().dtype(at::kLong).memory_format(at::MemoryFormat::Contiguous));
}

at::Tensor fixed_dequantize_meta(const at::Tensor& q, int64_t frac_bits, at::ScalarType dtype) {
  check_dequantize(q, frac_bits, dtype);
  return at::empty_symint(q.sym_sizes(), q.options().dtype(dtype).memory_format(at::MemoryFormat::Contiguous));
}

at::Tensor bdia_step__meta(at::Tensor& u, const at::Tensor& src, const at::Tensor& inc, const at::Tensor& sign,
                           int64_t frac_bits, int64_t shift) {
  check_bdia("bdia_step_", u, src, inc, sign, frac_bits, shift);
  return empty_bdia_low(u, shift);
}

void bdia_unstep__meta(at::Tensor& u, const at::Tensor& src, const at::Tensor& inc, const at::Tensor& sign,
                       const at::Tensor& low, int64_t frac_bits, int64_t shift) {
  check_bdia("bdia_unstep_", u, src, inc, sign, frac_bits, shift);
  check_bdia_low("bdia_unstep_", u, low, shift);
}

void fixed_update__meta(at::Tensor& acc, const at::Tensor& inc, int64_t frac_bits, int64_t sign) {
  check_fixed_update(acc, inc, frac_bits, sign);
}

at::Tensor all_finite_meta(const at::Tensor& x) {
  TORCH_CHECK(x.defined(), "revengine::all_finite: x is an undefined tensor");
  return meta_flag(x);
}

// ---------------------------------------------------------------------------------------------
// Autograd
// ---------------------------------------------------------------------------------------------
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct CouplingUpdateFn : public torch::autograd::Function<CouplingUpdateFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& f, double lam) {
    ctx->saved_data["lam"] = lam;
    ctx->saved_data["f_dtype"] = static_cast<int64_t>(f.scalar_type());
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::coupling_update(x, f, lam);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& g = grads[0];
    if (!g.defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const double lam = ctx->saved_data["lam"].toDouble();
    const auto f_dtype = static_cast<at::ScalarType>(ctx->saved_data["f_dtype"].toInt());
    at::Tensor gx = ctx->needs_input_grad(0) ? g * lam : at::Tensor();
    at::Tensor gf = ctx->needs_input_grad(1) ? g.to(f_dtype) : at::Tensor();
    return {gx, gf, at::Tensor()};
  }
};

at::Tensor coupling_update_autograd(const at::Tensor& x, const at::Tensor& f, double lam) {
  return CouplingUpdateFn::apply(x, f, lam);
}

// The mutating and fixed-point ops have no derivative: they are used by the reversible
// executor under no_grad. With grad mode on, an input that requires grad is an error (rather
// than a silently wrong gradient). Their Autograd kernels only check that and go on below
// autograd; the ADInplaceOrView kernels of the mutating ops bump the version counter of the
// mutated tensor, as aten in-place ops do (also under inference_mode for normal tensors).
void check_no_grad(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> inputs) {
  if (!at::GradMode::is_enabled()) return;
  for (const auto& in : inputs) {
    TORCH_CHECK(!(in.second->defined() && in.second->requires_grad()), "revengine::", op,
                " is not differentiable; it is used by the reversible executor under no_grad (input '", in.first,
                "' requires grad: call it under torch.no_grad() or detach the input)");
  }
}

void coupling_update__autograd(at::Tensor& x, const at::Tensor& f, double lam) {
  check_no_grad("coupling_update_", {{"x", &x}, {"f", &f}});
  at::AutoDispatchBelowAutograd guard;
  ops::coupling_update_(x, f, lam);
}

at::Tensor coupling_inverse__autograd(at::Tensor& y, const at::Tensor& f, double lam, bool check_finite) {
  check_no_grad("coupling_inverse_", {{"y", &y}, {"f", &f}});
  at::AutoDispatchBelowAutograd guard;
  return ops::coupling_inverse_(y, f, lam, check_finite);
}

void affine_update__autograd(at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift) {
  check_no_grad("affine_update_", {{"x", &x}, {"scale", &scale}, {"shift", &shift}});
  at::AutoDispatchBelowAutograd guard;
  ops::affine_update_(x, scale, shift);
}

at::Tensor affine_inverse__autograd(at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                                    bool check_finite) {
  check_no_grad("affine_inverse_", {{"y", &y}, {"scale", &scale}, {"shift", &shift}});
  at::AutoDispatchBelowAutograd guard;
  return ops::affine_inverse_(y, scale, shift, check_finite);
}

void fixed_update__autograd(at::Tensor& acc, const at::Tensor& inc, int64_t frac_bits, int64_t sign) {
  check_no_grad("fixed_update_", {{"inc", &inc}});
  at::AutoDispatchBelowAutograd guard;
  ops::fixed_update_(acc, inc, frac_bits, sign);
}

at::Tensor bdia_step__autograd(at::Tensor& u, const at::Tensor& src, const at::Tensor& inc, const at::Tensor& sign,
                               int64_t frac_bits, int64_t shift) {
  check_no_grad("bdia_step_", {{"inc", &inc}});
  at::AutoDispatchBelowAutograd guard;
  return ops::bdia_step_(u, src, inc, sign, frac_bits, shift);
}

void bdia_unstep__autograd(at::Tensor& u, const at::Tensor& src, const at::Tensor& inc, const at::Tensor& sign,
                           const at::Tensor& low, int64_t frac_bits, int64_t shift) {
  check_no_grad("bdia_unstep_", {{"inc", &inc}});
  at::AutoDispatchBelowAutograd guard;
  ops::bdia_unstep_(u, src, inc, sign, low, frac_bits, shift);
}

at::Tensor bdia_step__inplace(at::Tensor& u, const at::Tensor& src, const at::Tensor& inc, const at::Tensor& sign,
                              int64_t frac_bits, int64_t shift) {
  at::Tensor low;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    low = ops::bdia_step_(u, src, inc, sign, frac_bits, shift);
  }
  torch::autograd::impl::bump_version(u);
  return low;
}

void bdia_unstep__inplace(at::Tensor& u, const at::Tensor& src, const at::Tensor& inc, const at::Tensor& sign,
                          const at::Tensor& low, int64_t frac_bits, int64_t shift) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    ops::bdia_unstep_(u, src, inc, sign, low, frac_bits, shift);
  }
  torch::autograd::impl::bump_version(u);
}

void coupling_update__inplace(at::Tensor& x, const at::Tensor& f, double lam) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    ops::coupling_update_(x, f, lam);
  }
  torch::autograd::impl::bump_version(x);
}

at::Tensor coupling_inverse__inplace(at::Tensor& y, const at::Tensor& f, double lam, bool check_finite) {
  at::Tensor flag;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    flag = ops::coupling_inverse_(y, f, lam, check_finite);
  }
  torch::autograd::impl::bump_version(y);
  return flag;
}

void affine_update__inplace(at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    ops::affine_update_(x, scale, shift);
  }
  torch::autograd::impl::bump_version(x);
}

at::Tensor affine_inverse__inplace(at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                                   bool check_finite) {
  at::Tensor flag;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    flag = ops::affine_inverse_(y, scale, shift, check_finite);
  }
  torch::autograd::impl::bump_version(y);
  return flag;
}

void fixed_update__inplace(at::Tensor& acc, const at::Tensor& inc, int64_t frac_bits, int64_t sign) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    ops::fixed_update_(acc, inc, frac_bits, sign);
  }
  torch::autograd::impl::bump_version(acc);
}

at::Tensor fixed_quantize_autograd(const at::Tensor& x, int64_t frac_bits) {
  check_no_grad("fixed_quantize", {{"x", &x}});
  at::AutoDispatchBelowADInplaceOrView guard;
  return ops::fixed_quantize(x, frac_bits);
}

at::Tensor fixed_dequantize_autograd(const at::Tensor& q, int64_t frac_bits, at::ScalarType dtype) {
  // q is int64 and cannot require grad; the output is a constant for autograd.
  at::AutoDispatchBelowADInplaceOrView guard;
  return ops::fixed_dequantize(q, frac_bits, dtype);
}

at::Tensor all_finite_autograd(const at::Tensor& x) {
  // A bool result: allowed on tensors that require grad (e.g. checking parameters).
  at::AutoDispatchBelowADInplaceOrView guard;
  return ops::all_finite(x);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Dispatcher-calling wrappers (ops.h)
// ---------------------------------------------------------------------------------------------
namespace ops {

#define REVENGINE_OP_HANDLE(NAME, SIG)                                                          \
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("revengine::" NAME, "") \
                             .typed<SIG>()

at::Tensor coupling_update(const at::Tensor& x, const at::Tensor& f, double lam) {
  REVENGINE_OP_HANDLE("coupling_update", at::Tensor(const at::Tensor&, const at::Tensor&, double));
  return op.call(x, f, lam);
}

void coupling_update_(at::Tensor& x, const at::Tensor& f, double lam) {
  REVENGINE_OP_HANDLE("coupling_update_", void(at::Tensor&, const at::Tensor&, double));
  op.call(x, f, lam);
}

at::Tensor coupling_inverse_(at::Tensor& y, const at::Tensor& f, double lam, bool check_finite) {
  REVENGINE_OP_HANDLE("coupling_inverse_", at::Tensor(at::Tensor&, const at::Tensor&, double, bool));
  return op.call(y, f, lam, check_finite);
}

void affine_update_(at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift) {
  REVENGINE_OP_HANDLE("affine_update_", void(at::Tensor&, const at::Tensor&, const at::Tensor&));
  op.call(x, scale, shift);
}

at::Tensor affine_inverse_(at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift, bool check_finite) {
  REVENGINE_OP_HANDLE("affine_inverse_",
                      at::Tensor(at::Tensor&, const at::Tensor&, const at::Tensor&, bool));
  return op.call(y, scale, shift, check_finite);
}

at::Tensor fixed_quantize(const at::Tensor& x, int64_t frac_bits) {
  REVENGINE_OP_HANDLE("fixed_quantize", at::Tensor(const at::Tensor&, int64_t));
  return op.call(x, frac_bits);
}

at::Tensor fixed_dequantize(const at::Tensor& q, int64_t frac_bits, at::ScalarType dtype) {
  REVENGINE_OP_HANDLE("fixed_dequantize", at::Tensor(const at::Tensor&, int64_t, at::ScalarType));
  return op.call(q, frac_bits, dtype);
}

void fixed_update_(at::Tensor& acc, const at::Tensor& inc, int64_t frac_bits, int64_t sign) {
  REVENGINE_OP_HANDLE("fixed_update_", void(at::Tensor&, const at::Tensor&, int64_t, int64_t));
  op.call(acc, inc, frac_bits, sign);
}

at::Tensor bdia_step_(at::Tensor& u, const at::Tensor& src, const at::Tensor& inc, const at::Tensor& sign,
                      int64_t frac_bits, int64_t shift) {
  REVENGINE_OP_HANDLE("bdia_step_", at::Tensor(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                int64_t, int64_t));
  return op.call(u, src, inc, sign, frac_bits, shift);
}

void bdia_unstep_(at::Tensor& u, const at::Tensor& src, const at::Tensor& inc, const at::Tensor& sign,
                  const at::Tensor& low, int64_t frac_bits, int64_t shift) {
  REVENGINE_OP_HANDLE("bdia_unstep_", void(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, int64_t, int64_t));
  op.call(u, src, inc, sign, low, frac_bits, shift);
}

at::Tensor all_finite(const at::Tensor& x) {
  REVENGINE_OP_HANDLE("all_finite", at::Tensor(const at::Tensor&));
  return op.call(x);
}

#undef REVENGINE_OP_HANDLE

}  // namespace ops
}  // namespace revengine

// ---------------------------------------------------------------------------------------------
// Registration. This is the only TORCH_LIBRARY block of namespace revengine; other files use
// TORCH_LIBRARY_FRAGMENT.
// ---------------------------------------------------------------------------------------------
TORCH_LIBRARY(revengine, m) {
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
  m.def("coupling_update(Tensor x, Tensor f, float lam) -> Tensor", tags);
  m.def("coupling_update_(Tensor(a!) x, Tensor f, float lam) -> ()", tags);
  m.def("coupling_inverse_(Tensor(a!) y, Tensor f, float lam, bool check_finite) -> Tensor", tags);
  m.def("affine_update_(Tensor(a!) x, Tensor scale, Tensor shift) -> ()", tags);
  m.def("affine_inverse_(Tensor(a!) y, Tensor scale, Tensor shift, bool check_finite) -> Tensor", tags);
  m.def("fixed_quantize(Tensor x, int frac_bits) -> Tensor", tags);
  m.def("fixed_dequantize(Tensor q, int frac_bits, ScalarType dtype) -> Tensor", tags);
  m.def("fixed_update_(Tensor(a!) acc, Tensor inc, int frac_bits, int sign) -> ()", tags);
  m.def("all_finite(Tensor x) -> Tensor", tags);
  m.def("bdia_step_(Tensor(a!) u, Tensor src, Tensor inc, Tensor sign, int frac_bits, int shift) -> Tensor", tags);
  m.def("bdia_unstep_(Tensor(a!) u, Tensor src, Tensor inc, Tensor sign, Tensor low, int frac_bits, int shift) -> ()",
        tags);
}

TORCH_LIBRARY_IMPL(revengine, CPU, m) {
  using namespace revengine;
  m.impl("coupling_update", TORCH_FN(coupling_update_cpu));
  m.impl("coupling_update_", TORCH_FN(coupling_update__cpu));
  m.impl("coupling_inverse_", TORCH_FN(coupling_inverse__cpu));
  m.impl("affine_update_", TORCH_FN(affine_update__cpu));
  m.impl("affine_inverse_", TORCH_FN(affine_inverse__cpu));
  m.impl("fixed_quantize", TORCH_FN(fixed_quantize_cpu));
  m.impl("fixed_dequantize", TORCH_FN(fixed_dequantize_cpu));
  m.impl("fixed_update_", TORCH_FN(fixed_update__cpu));
  m.impl("all_finite", TORCH_FN(all_finite_cpu));
  m.impl("bdia_step_", TORCH_FN(bdia_step__cpu));
  m.impl("bdia_unstep_", TORCH_FN(bdia_unstep__cpu));
}

TORCH_LIBRARY_IMPL(revengine, Meta, m) {
  using namespace revengine;
  m.impl("coupling_update", TORCH_FN(coupling_update_meta));
  m.impl("coupling_update_", TORCH_FN(coupling_update__meta));
  m.impl("coupling_inverse_", TORCH_FN(coupling_inverse__meta));
  m.impl("affine_update_", TORCH_FN(affine_update__meta));
  m.impl("affine_inverse_", TORCH_FN(affine_inverse__meta));
  m.impl("fixed_quantize", TORCH_FN(fixed_quantize_meta));
  m.impl("fixed_dequantize", TORCH_FN(fixed_dequantize_meta));
  m.impl("fixed_update_", TORCH_FN(fixed_update__meta));
  m.impl("all_finite", TORCH_FN(all_finite_meta));
  m.impl("bdia_step_", TORCH_FN(bdia_step__meta));
  m.impl("bdia_unstep_", TORCH_FN(bdia_unstep__meta));
}

TORCH_LIBRARY_IMPL(revengine, Autograd, m) {
  using namespace revengine;
  m.impl("coupling_update", TORCH_FN(coupling_update_autograd));
  m.impl("coupling_update_", TORCH_FN(coupling_update__autograd));
  m.impl("coupling_inverse_", TORCH_FN(coupling_inverse__autograd));
  m.impl("affine_update_", TORCH_FN(affine_update__autograd));
  m.impl("affine_inverse_", TORCH_FN(affine_inverse__autograd));
  m.impl("fixed_quantize", TORCH_FN(fixed_quantize_autograd));
  m.impl("fixed_dequantize", TORCH_FN(fixed_dequantize_autograd));
  m.impl("fixed_update_", TORCH_FN(fixed_update__autograd));
  m.impl("all_finite", TORCH_FN(all_finite_autograd));
  m.impl("bdia_step_", TORCH_FN(bdia_step__autograd));
  m.impl("bdia_unstep_", TORCH_FN(bdia_unstep__autograd));
}

TORCH_LIBRARY_IMPL(revengine, ADInplaceOrView, m) {
  using namespace revengine;
  m.impl("coupling_update_", TORCH_FN(coupling_update__inplace));
  m.impl("coupling_inverse_", TORCH_FN(coupling_inverse__inplace));
  m.impl("affine_update_", TORCH_FN(affine_update__inplace));
  m.impl("affine_inverse_", TORCH_FN(affine_inverse__inplace));
  m.impl("fixed_update_", TORCH_FN(fixed_update__inplace));
  m.impl("bdia_step_", TORCH_FN(bdia_step__inplace));
  m.impl("bdia_unstep_", TORCH_FN(bdia_unstep__inplace));
}
