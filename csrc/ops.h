// Element-wise kernels of revengine, registered as torch ops (namespace "revengine").
// The executor calls them through these wrappers, which go through the dispatcher so that
// the CPU, CUDA and Meta implementations are all reachable from one call site.
#pragma once
#include <ATen/ATen.h>

namespace revengine {
namespace ops {

// y = lam * x + f  (out of place, differentiable through torch.autograd)
at::Tensor coupling_update(const at::Tensor& x, const at::Tensor& f, double lam);
// x <- lam * x + f  (in place). f may have another floating dtype (autocast); math in x's opmath type.
void coupling_update_(at::Tensor& x, const at::Tensor& f, double lam);
// y <- (y - f) / lam  (in place). Returns a 0-dim bool tensor: true when every result is finite
// (always true when check_finite is false).
at::Tensor coupling_inverse_(at::Tensor& y, const at::Tensor& f, double lam, bool check_finite);
// x <- x * scale + shift (in place)
void affine_update_(at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift);
// y <- (y - shift) / scale (in place); returns the 0-dim bool all-finite flag as above.
at::Tensor affine_inverse_(at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift, bool check_finite);
// Fixed point: q = round(x * 2^frac_bits) as int64. Non-finite or out-of-range input is an error.
at::Tensor fixed_quantize(const at::Tensor& x, int64_t frac_bits);
// x = q * 2^-frac_bits in the given floating dtype.
at::Tensor fixed_dequantize(const at::Tensor& q, int64_t frac_bits, at::ScalarType dtype);
// acc <- acc + sign * round(inc * 2^frac_bits), acc int64, inc floating, sign = +1 or -1.
// Non-finite inc is an error.
void fixed_update_(at::Tensor& acc, const at::Tensor& inc, int64_t frac_bits, int64_t sign);
// One exact BDIA layer (layers.cpp), in place on the int64 stream u = p_prev -> p_next, with
// src = p (int64), inc = f(p) (floating), sign [B] int64 (+-1 per sample along dim 0), g = sign 2^-shift:
// u <- g u (rounded down) + (1 - g) src + round((1 + g) inc 2^frac_bits); returns the shift bits
// of each u element that g u dropped, packed 8/shift to a uint8 (shift = 1, 2, 4; else one a byte).
// A non-finite or out-of-range increment is an error that leaves u unchanged.
at::Tensor bdia_step_(at::Tensor& u, const at::Tensor& src, const at::Tensor& inc, const at::Tensor& sign,
                      int64_t frac_bits, int64_t shift);
// bdia_step_'s exact inverse: u = p_next -> p_prev, given the same src, inc, sign and its `low`.
void bdia_unstep_(at::Tensor& u, const at::Tensor& src, const at::Tensor& inc, const at::Tensor& sign,
                  const at::Tensor& low, int64_t frac_bits, int64_t shift);
// 0-dim bool tensor: true when every element is finite.
at::Tensor all_finite(const at::Tensor& x);

}  // namespace ops
}  // namespace revengine
