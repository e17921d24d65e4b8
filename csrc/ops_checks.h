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
