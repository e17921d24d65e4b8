// Argument checks and layout helpers shared by the CPU/Meta kernels (ops.cpp) and the CUDA glue
// (cuda/ops_cuda.cpp), so that every device gives the same error messages and the same handling
// of non-contiguous, aliasing and mixed-dtype arguments. Symbolic-shape safe where the Meta
// kernels use them. No pybind11 here.
#pragma once
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <utility>

namespace revengine {
namespace detail {

// ---------------------------------------------------------------------------------------------
// Argument checks
// ---------------------------------------------------------------------------------------------
inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), "revengine::", op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(is_supported_float(t.scalar_type()), "revengine::", op, ": ", name,
              " must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
}

inline void check_like(const char* op, const char* xname, const at::Tensor& x, const char* name,
                       const at::Tensor& t) {
  check_float(op, name, t);
  TORCH_CHECK(t.device() == x.device(), "revengine::", op, ": ", name, " is on ", t.device(),
              " but ", xname, " is on ", x.device(), "; they must be on the same device");
  TORCH_CHECK(t.sym_sizes() == x.sym_sizes(), "revengine::", op, ": ", name, " must have the same shape as ",
              xname, " (no broadcasting), got ", name, " of shape ", t.sym_sizes(), " and ", xname,
              " of shape ", x.sym_sizes());
}

inline void check_lam_inverse(const char* op, double lam, at::ScalarType xtype) {
  TORCH_CHECK(lam != 0.0, "revengine::", op, ": lam must be non-zero to invert the coupling, got lam = ", lam);
  TORCH_CHECK(std::isfinite(lam), "revengine::", op, ": lam must be finite, got lam = ", lam);
  if (xtype != at::kDouble) {
    const float lf = static_cast<float>(lam);
    TORCH_CHECK(lf != 0.0f && std::isfinite(lf), "revengine::", op, ": lam = ", lam,
                " is not representable as a non-zero finite float32, the arithmetic type for ", xtype);
  }
}

inline void check_frac_bits(const char* op, int64_t frac_bits) {
  TORCH_CHECK(frac_bits >= 0 && frac_bits <= 1023, "revengine::", op, ": frac_bits must be in [0, 1023], got ",
              frac_bits);
}

inline void check_coupling(const char* op, const at::Tensor& x, const at::Tensor& f) {
  check_float(op, "x", x);
  check_like(op, "x", x, "f", f);
}

inline void check_affine(const char* op, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift) {
  check_float(op, "x", x);
  check_like(op, "x", x, "scale", scale);
  check_like(op, "x", x, "shift", shift);
}

inline void check_fixed_update(const at::Tensor& acc, const at::Tensor& inc, int64_t frac_bits, int64_t sign) {
  const char* op = "fixed_update_";
  TORCH_CHECK(acc.defined() && acc.scalar_type() == at::kLong, "revengine::", op,
              ": acc must be an int64 tensor, got ", acc.defined() ? c10::toString(acc.scalar_type()) : "undefined");
  check_like(op, "acc", acc, "inc", inc);
  check_frac_bits(op, frac_bits);
  TORCH_CHECK(sign == 1 || sign == -1, "revengine::", op, ": sign must be +1 or -1, got ", sign);
}

inline void check_dequantize(const at::Tensor& q, int64_t frac_bits, at::ScalarType dtype) {
  TORCH_CHECK(q.defined() && q.scalar_type() == at::kLong, "revengine::fixed_dequantize: q must be an int64 tensor, got ",
              q.defined() ? c10::toString(q.scalar_type()) : "undefined");
  check_frac_bits("fixed_dequantize", frac_bits);
  TORCH_CHECK(is_supported_float(dtype),
              "revengine::fixed_dequantize: dtype must be float32, float64, bfloat16 or float16, got ", dtype);
}

// The error of fixed_quantize / fixed_update_ for `nbad` of `n` elements of `name` that are
// non-finite or out of the fixed-point range; `first` (-1: unknown) is the flat index of the first
// one in the contiguous input and `first_value` its value.
inline std::string fixed_range_error(const char* op, const char* name, int64_t n, int64_t nbad, int64_t frac_bits,
                                     int64_t first, double first_value) {
  std::ostringstream ss;
  ss.precision(17);
  ss << "revengine::" << op << ": " << nbad << " of " << n << " elements of " << name
     << " are non-finite or out of the fixed-point range (|" << name << "| * 2^" << frac_bits
     << " must be < 2^62)";
  if (first >= 0) ss << "; first bad value: " << first_value << " at flat index " << first;
  return ss.str();
}

// BDIA's exact step (bdia_step_ / bdia_unstep_, see ops.cpp): how many elements' dropped bits
// share a byte of `low` (8/shift for shift 1, 2, 4; one a byte otherwise) and its length.
inline int64_t bdia_per_byte(int64_t shift) { return (shift < 8 && 8 % shift == 0) ? 8 / shift : 1; }

inline c10::SymInt bdia_low_bytes(const c10::SymInt& n, int64_t shift) {
  const int64_t per = bdia_per_byte(shift);
  return (n + (per - 1)) / per;
}

// The uint8 tensor bdia_step_ fills with u's dropped bits.
inline at::Tensor empty_bdia_low(const at::Tensor& u, int64_t shift) {
  return at::empty_symint({bdia_low_bytes(u.sym_numel(), shift)}, u.options().dtype(at::kByte));
}

// The factors of inc in q = round(inc * scale): {(1 + 2^-shift) 2^frac_bits, (1 - 2^-shift) 2^frac_bits}
// for sign +1 and -1 (both exact in double). The CPU kernel and the error message use these; the
// torch-free CUDA launcher computes the same two products.
inline std::pair<double, double> bdia_scales(int64_t frac_bits, int64_t shift) {
  const double g = std::ldexp(1.0, static_cast<int>(-shift));
  return {std::ldexp(1.0 + g, static_cast<int>(frac_bits)), std::ldexp(1.0 - g, static_cast<int>(frac_bits))};
}

inline void check_bdia(const char* op, const at::Tensor& u, const at::Tensor& src, const at::Tensor& inc,
                       const at::Tensor& sign, int64_t frac_bits, int64_t shift) {
  TORCH_CHECK(u.defined() && u.scalar_type() == at::kLong, "revengine::", op,
              ": u must be an int64 tensor (the fixed-point stream), got ", u.defined() ? u.toString() : "undefined");
  TORCH_CHECK(src.defined() && src.scalar_type() == at::kLong, "revengine::", op,
              ": src must be an int64 tensor (the fixed-point stream), got ",
              src.defined() ? src.toString() : "undefined");
  TORCH_CHECK(src.device() == u.device() && src.sym_sizes() == u.sym_sizes(), "revengine::", op,
              ": src must have u's shape and device, got src ", src.sym_sizes(), " on ", src.device(), " and u ",
              u.sym_sizes(), " on ", u.device());
  check_like(op, "u", u, "inc", inc);
  TORCH_CHECK(u.dim() >= 1 && u.sym_size(0) > 0, "revengine::", op,
              ": u needs a non-empty sample dimension 0 (one sign per sample), got shape ", u.sym_sizes());
  TORCH_CHECK(sign.defined() && sign.scalar_type() == at::kLong && sign.dim() == 1 &&
                  sign.sym_size(0) == u.sym_size(0) && sign.device() == u.device(),
              "revengine::", op, ": sign must be an int64 tensor of shape [", u.sym_size(0),
              "] (one +-1 per sample) on u's device, got ",
              sign.defined() ? sign.toString() : "undefined", " of shape ",
              sign.defined() ? sign.sym_sizes() : c10::SymIntArrayRef());
  TORCH_CHECK(shift >= 1 && shift <= 8, "revengine::", op, ": shift must be in 1..8 (gamma = 2^-shift), got ", shift);
  check_frac_bits(op, frac_bits);
}

inline void check_bdia_low(const char* op, const at::Tensor& u, const at::Tensor& low, int64_t shift) {
  TORCH_CHECK(low.defined() && low.scalar_type() == at::kByte && low.dim() == 1 && low.device() == u.device() &&
                  low.sym_size(0) == bdia_low_bytes(u.sym_numel(), shift),
              "revengine::", op, ": low must be the uint8 tensor of shape [", bdia_low_bytes(u.sym_numel(), shift),
              "] that bdia_step_ returned for this u and shift, got ", low.defined() ? low.toString() : "undefined",
              " of shape ", low.defined() ? low.sym_sizes() : c10::SymIntArrayRef());
}

// Error path only (ATen ops on any device): the message for increments inc * (1 + g) that are
// non-finite or out of the fixed-point range, computed as the kernels do.
inline std::string bdia_range_error(const char* op, const at::Tensor& inc, const at::Tensor& sign, int64_t frac_bits,
                                    int64_t shift) {
  const auto scales = bdia_scales(frac_bits, shift);
  const auto dopt = sign.options().dtype(at::kDouble);
  const at::Tensor scale = at::where(sign.lt(0), at::scalar_tensor(scales.second, dopt),
                                     at::scalar_tensor(scales.first, dopt))
                               .view({-1, 1});
  const at::Tensor v = inc.to(at::kDouble).reshape({sign.size(0), -1}) * scale;
  const at::Tensor bad = v.isfinite().logical_not().logical_or_(v.abs() >= std::ldexp(1.0, 62)).reshape(-1);
  const int64_t nbad = bad.sum().item<int64_t>();
  int64_t first = -1;
  double value = 0.0;
  if (nbad > 0) {
    first = bad.nonzero().select(1, 0).select(0, 0).item<int64_t>();
    value = inc.reshape(-1).select(0, first).item<double>();
  }
  return fixed_range_error(op, "inc * (1 + g)", inc.numel(), nbad, frac_bits, first, value);
}

// ---------------------------------------------------------------------------------------------
// Layout helpers
// ---------------------------------------------------------------------------------------------

// Operand `t` made safe to read while `dst` (contiguous) is written element by element:
// contiguous, and a private copy if it overlaps `dst` other than element-for-element.
inline at::Tensor operand_for(const at::Tensor& dst, const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (dst.numel() == 0) return c;
  const auto status = at::get_overlap_status(dst, c);
  if (status == at::MemOverlapStatus::No) return c;
  if (status == at::MemOverlapStatus::Full && dst.scalar_type() == c.scalar_type()) return c;
  return c.clone(at::MemoryFormat::Contiguous);
}

// Runs `fn(contiguous_x)` on a contiguous tensor that aliases x when possible, else on a
// contiguous copy that is written back to x afterwards (only when fn returns true).
template <typename Fn>
void inplace_contiguous(at::Tensor& x, Fn&& fn) {
  at::assert_no_internal_overlap(x);
  if (x.is_contiguous()) {
    fn(x);
  } else {
    at::Tensor xc = x.contiguous();
    if (fn(xc)) x.copy_(xc);
  }
}

// Operand dtypes with a kernel of their own for each x dtype: x's dtype and the autocast
// partners (float32 x with bfloat16/float16 operands, bfloat16/float16 x with float32 operands).
// Any other operand is first converted to x's opmath type, which is exactly the kernel's own
// first step on each element, so results are the same; only fewer kernels are compiled.
inline bool has_pair_kernel(at::ScalarType x, at::ScalarType f) {
  if (x == f) return true;
  if (x == at::kFloat) return f == at::kBFloat16 || f == at::kHalf;
  if (x == at::kBFloat16 || x == at::kHalf) return f == at::kFloat;
  return false;
}

inline at::Tensor as_kernel_operand(at::ScalarType x, const at::Tensor& f) {
  if (has_pair_kernel(x, f.scalar_type())) return f;
  return f.to(x == at::kDouble ? at::kDouble : at::kFloat);
}

// scale and shift of different dtypes are first brought to their promoted type (an exact
// conversion), then to a dtype with a kernel for x (see as_kernel_operand).
inline std::pair<at::Tensor, at::Tensor> affine_operands(at::ScalarType x, const at::Tensor& scale,
                                                         const at::Tensor& shift) {
  if (scale.scalar_type() == shift.scalar_type()) return {as_kernel_operand(x, scale), as_kernel_operand(x, shift)};
  const auto t = at::promote_types(scale.scalar_type(), shift.scalar_type());
  return {as_kernel_operand(x, scale.to(t)), as_kernel_operand(x, shift.to(t))};
}

inline at::Tensor bool_scalar(bool v, const at::Tensor& like) {
  return at::scalar_tensor(v, like.options().dtype(at::kBool));
}

}  // namespace detail
}  // namespace revengine
