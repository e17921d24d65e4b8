// CUDA kernels of the revengine ops (schemas in ../ops.cpp): the torch glue around the C
// launchers of coupling_kernels.cu. Same argument checks and messages as the CPU kernels (shared
// through ../ops_checks.h), same handling of non-contiguous targets (a contiguous copy written
// back), of aliasing operands (a private copy when the overlap is partial) and of operand dtypes
// without a kernel of their own (converted to x's opmath type first). Work is queued on the
// current CUDA stream of the tensors' device. The all-finite flags stay on the device (no
// synchronisation); fixed_quantize, fixed_update_ and bdia_(un)step_ synchronise once to raise
// their errors.
//
// Built only into a CUDA build of the extension (setup.py with a CUDA torch and nvcc, or CMake
// with CUDA); compile-checked against the CPU torch headers by scripts/check_cuda_compile.sh.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <functional>

#include "cuda_glue.h"
#include "../ops_checks.h"
#include "coupling_kernels.h"

namespace revengine {
namespace {

using namespace ::revengine::detail;
using namespace ::revengine::cuda_glue;

uint8_t* flag_ptr(at::Tensor& flag) { return static_cast<uint8_t*>(flag.data_ptr()); }

at::Tensor device_flag(const at::Tensor& like) { return at::empty({}, like.options().dtype(at::kBool)); }

// After a fixed-point launch: raises the CPU kernels' error when some element was bad. Reads the
// 2-word status (count, first bad index) back, which synchronises with the stream.
void raise_if_bad(const char* op, const char* name, const at::Tensor& input, const at::Tensor& status,
                  int64_t frac_bits, const char* suffix, const std::function<void()>& before_raise) {
  const at::Tensor st = status.to(at::kCPU);
  const int64_t* s = st.const_data_ptr<int64_t>();
  const int64_t nbad = s[0];
  if (nbad == 0) return;
  const int64_t first = s[1];
  const double value = first >= 0 ? input.reshape(-1).select(0, first).item<double>() : 0.0;
  if (before_raise) before_raise();
  TORCH_CHECK(false, fixed_range_error(op, name, input.numel(), nbad, frac_bits, first, value), suffix);
}

// ---------------------------------------------------------------------------------------------
// CUDA kernels
// ---------------------------------------------------------------------------------------------
at::Tensor coupling_update_cuda(const at::Tensor& x, const at::Tensor& f, double lam) {
  check_coupling("coupling_update", x, f);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const at::Tensor fc = as_kernel_operand(x.scalar_type(), f).contiguous();  // out is fresh: no overlap
  check_launch("coupling_update",
               revengine_cuda_coupling_update(out.data_ptr(), xc.const_data_ptr(), dtype_code(xc.scalar_type()),
                                              fc.const_data_ptr(), dtype_code(fc.scalar_type()), lam, xc.numel(),
                                              current_stream(x)));
  return out;
}

void coupling_update__cuda(at::Tensor& x, const at::Tensor& f, double lam) {
  check_coupling("coupling_update_", x, f);
  const c10::cuda::CUDAGuard guard(x.device());
  inplace_contiguous(x, [&](at::Tensor& xc) {
    const at::Tensor fc = operand_for(xc, as_kernel_operand(xc.scalar_type(), f));
    check_launch("coupling_update_",
                 revengine_cuda_coupling_update_(xc.data_ptr(), dtype_code(xc.scalar_type()), fc.const_data_ptr(),
                                                 dtype_code(fc.scalar_type()), lam, xc.numel(), current_stream(xc)));
    return true;
  });
}

at::Tensor coupling_inverse__cuda(at::Tensor& y, const at::Tensor& f, double lam, bool check_finite) {
  check_coupling("coupling_inverse_", y, f);
  check_lam_inverse("coupling_inverse_", lam, y.scalar_type());
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor flag = device_flag(y);
  inplace_contiguous(y, [&](at::Tensor& yc) {
    const at::Tensor fc = operand_for(yc, as_kernel_operand(yc.scalar_type(), f));
    check_launch("coupling_inverse_",
                 revengine_cuda_coupling_inverse_(yc.data_ptr(), dtype_code(yc.scalar_type()), fc.const_data_ptr(),
                                                  dtype_code(fc.scalar_type()), lam, yc.numel(), flag_ptr(flag),
                                                  check_finite ? 1 : 0, current_stream(yc)));
    return true;
  });
  return flag;
}

void affine_update__cuda(at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift) {
  check_affine("affine_update_", x, scale, shift);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto ops_ = affine_operands(x.scalar_type(), scale, shift);
  inplace_contiguous(x, [&](at::Tensor& xc) {
    const at::Tensor sc = operand_for(xc, ops_.first);
    const at::Tensor sh = operand_for(xc, ops_.second);
    check_launch("affine_update_",
                 revengine_cuda_affine_update_(xc.data_ptr(), dtype_code(xc.scalar_type()), sc.const_data_ptr(),
                                               sh.const_data_ptr(), dtype_code(sc.scalar_type()), xc.numel(),
                                               current_stream(xc)));
    return true;
  });
}

at::Tensor affine_inverse__cuda(at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift, bool check_finite) {
  check_affine("affine_inverse_", y, scale, shift);
  const c10::cuda::CUDAGuard guard(y.device());
  const auto ops_ = affine_operands(y.scalar_type(), scale, shift);
  at::Tensor flag = device_flag(y);
  inplace_contiguous(y, [&](at::Tensor& yc) {
    const at::Tensor sc = operand_for(yc, ops_.first);
    const at::Tensor sh = operand_for(yc, ops_.second);
    check_launch("affine_inverse_",
                 revengine_cuda_affine_inverse_(yc.data_ptr(), dtype_code(yc.scalar_type()), sc.const_data_ptr(),
                                                sh.const_data_ptr(), dtype_code(sc.scalar_type()), yc.numel(),
                                                flag_ptr(flag), check_finite ? 1 : 0, current_stream(yc)));
    return true;
  });
  return flag;
}

at::Tensor fixed_quantize_cuda(const at::Tensor& x, int64_t frac_bits) {
  check_float("fixed_quantize", "x", x);
  check_frac_bits("fixed_quantize", frac_bits);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kLong).memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = xc.numel();
  if (n == 0) return q;
  at::Tensor status = at::empty({2}, x.options().dtype(at::kLong));
  check_launch("fixed_quantize",
               revengine_cuda_fixed_quantize(xc.const_data_ptr(), dtype_code(xc.scalar_type()), q.data_ptr<int64_t>(),
                                             static_cast<int>(frac_bits), n, status.data_ptr<int64_t>(),
                                             current_stream(x)));
  raise_if_bad("fixed_quantize", "x", xc, status, frac_bits, "", nullptr);
  return q;
}

at::Tensor fixed_dequantize_cuda(const at::Tensor& q, int64_t frac_bits, at::ScalarType dtype) {
  check_dequantize(q, frac_bits, dtype);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = q.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(dtype).memory_format(at::MemoryFormat::Contiguous));
  check_launch("fixed_dequantize",
               revengine_cuda_fixed_dequantize(qc.const_data_ptr<int64_t>(), out.data_ptr(), dtype_code(dtype),
                                               static_cast<int>(frac_bits), qc.numel(), current_stream(q)));
  return out;
}

void fixed_update__cuda(at::Tensor& acc, const at::Tensor& inc, int64_t frac_bits, int64_t sign) {
  check_fixed_update(acc, inc, frac_bits, sign);
  const c10::cuda::CUDAGuard guard(acc.device());
  inplace_contiguous(acc, [&](at::Tensor& ac) {
    const at::Tensor ic = operand_for(ac, inc);
    const int64_t n = ac.numel();
    if (n == 0) return true;
    at::Tensor status = at::empty({2}, ac.options());
    auto run = [&](int64_t s) {
      check_launch("fixed_update_",
                   revengine_cuda_fixed_update_(ac.data_ptr<int64_t>(), ic.const_data_ptr(),
                                                dtype_code(ic.scalar_type()), static_cast<int>(frac_bits), s, n,
                                                status.data_ptr<int64_t>(), current_stream(ac)));
    };
    run(sign);
    // On error, undo the good increments (bad ones added 0) so that acc is left unchanged, as the
    // CPU kernel does: wrap-around integer arithmetic makes this exact. A contiguous copy is
    // simply dropped instead (inplace_contiguous writes nothing back when this throws).
    raise_if_bad("fixed_update_", "inc", ic, status, frac_bits, " (acc was left unchanged)", [&] {
      if (ac.is_same(acc)) run(-sign);
    });
    return true;
  });
}

// One direction of BDIA's exact step (kernels in coupling_kernels.cu); synchronises once, like
// fixed_update_, to raise the CPU kernel's error, after undoing the launch (u left unchanged).
void bdia_cuda(const char* op, bool forward, at::Tensor& u, const at::Tensor& src, const at::Tensor& inc,
               const at::Tensor& sign, const at::Tensor& low, int64_t frac_bits, int64_t shift) {
  const int64_t n = u.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(u.device());
  const int64_t inner = n / u.size(0);
  const at::Tensor sg = sign.contiguous();
  inplace_contiguous(u, [&](at::Tensor& uc) {
    const at::Tensor sc = operand_for(uc, src);
    const at::Tensor ic = operand_for(uc, inc);
    at::Tensor status = at::empty({2}, uc.options());
    auto run = [&](bool fwd, const at::Tensor& lowbuf) {
      check_launch(op, revengine_cuda_bdia_step(uc.data_ptr<int64_t>(), sc.const_data_ptr<int64_t>(),
                                                ic.const_data_ptr(), dtype_code(ic.scalar_type()),
                                                sg.const_data_ptr<int64_t>(), static_cast<uint8_t*>(lowbuf.data_ptr()),
                                                n, inner, static_cast<int>(frac_bits), static_cast<int>(shift),
                                                fwd ? 1 : 0, status.data_ptr<int64_t>(), current_stream(uc)));
    };
    run(forward, low);
    if (status.select(0, 0).item<int64_t>() == 0) return true;
    // Undoing an inverse rewrites the bytes it read: into a scratch copy.
    if (uc.is_same(u)) run(!forward, forward ? low : low.clone());
    TORCH_CHECK(false, bdia_range_error(op, ic, sg, frac_bits, shift), " (u was left unchanged)");
    return false;
  });
}

at::Tensor bdia_step__cuda(at::Tensor& u, const at::Tensor& src, const at::Tensor& inc, const at::Tensor& sign,
                           int64_t frac_bits, int64_t shift) {
  check_bdia("bdia_step_", u, src, inc, sign, frac_bits, shift);
  at::Tensor low = empty_bdia_low(u, shift);
  bdia_cuda("bdia_step_", true, u, src, inc, sign, low, frac_bits, shift);
  return low;
}

void bdia_unstep__cuda(at::Tensor& u, const at::Tensor& src, const at::Tensor& inc, const at::Tensor& sign,
                       const at::Tensor& low, int64_t frac_bits, int64_t shift) {
  check_bdia("bdia_unstep_", u, src, inc, sign, frac_bits, shift);
  check_bdia_low("bdia_unstep_", u, low, shift);
  // The kernel only reads low in this direction; a contiguous view of the caller's tensor.
  bdia_cuda("bdia_unstep_", false, u, src, inc, sign, low.contiguous(), frac_bits, shift);
}

at::Tensor all_finite_cuda(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.defined(), "revengine::all_finite: x is an undefined tensor");
  at::Tensor x = x_in;
  if (x.is_complex()) x = at::view_as_real(x.resolve_conj());
  if (!x.is_floating_point()) return bool_scalar(true, x_in);  // integers and bools are always finite
  TORCH_CHECK(is_supported_float(x.scalar_type()), "revengine::all_finite: unsupported dtype ", x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor flag = device_flag(x_in);
  check_launch("all_finite", revengine_cuda_all_finite(xc.const_data_ptr(), dtype_code(xc.scalar_type()), xc.numel(),
                                                       flag_ptr(flag), current_stream(xc)));
  return flag;
}

}  // namespace
}  // namespace revengine

TORCH_LIBRARY_IMPL(revengine, CUDA, m) {
  using namespace revengine;
  m.impl("coupling_update", TORCH_FN(coupling_update_cuda));
  m.impl("coupling_update_", TORCH_FN(coupling_update__cuda));
  m.impl("coupling_inverse_", TORCH_FN(coupling_inverse__cuda));
  m.impl("affine_update_", TORCH_FN(affine_update__cuda));
  m.impl("affine_inverse_", TORCH_FN(affine_inverse__cuda));
  m.impl("fixed_quantize", TORCH_FN(fixed_quantize_cuda));
  m.impl("fixed_dequantize", TORCH_FN(fixed_dequantize_cuda));
  m.impl("fixed_update_", TORCH_FN(fixed_update__cuda));
  m.impl("all_finite", TORCH_FN(all_finite_cuda));
  m.impl("bdia_step_", TORCH_FN(bdia_step__cuda));
  m.impl("bdia_unstep_", TORCH_FN(bdia_unstep__cuda));
}
