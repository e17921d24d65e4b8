/* CUDA kernels of revengine's element-wise ops (the CUDA twins of csrc/ops.cpp), behind plain C
 * launchers. This header and coupling_kernels.cu do not depend on torch: the torch glue is
 * ops_cuda.cpp. The arithmetic is the contract in the header comment of csrc/ops.cpp, so that
 * results agree with the CPU kernels bit for bit.
 *
 * Conventions for every launcher:
 *   - tensors are contiguous device buffers of n elements (n >= 0); outputs may alias inputs
 *     element for element (out == x, f == x), never partially;
 *   - `stream` is a cudaStream_t (NULL: the legacy default stream); the work is queued on it and
 *     nothing synchronises;
 *   - the return value is a cudaError_t (0 = cudaSuccess); an unsupported dtype code gives
 *     cudaErrorInvalidValue (1) and queues nothing;
 *   - dtype codes are the REVENGINE_CUDA_* constants below. The float ops take an operand (f,
 *     scale/shift) of x's dtype, or float32 with bfloat16/float16 x, or bfloat16/float16 with
 *     float32 x (the pairs the CPU kernels have); convert any other operand to x's opmath type
 *     (float64 for float64 x, else float32) first: that is exactly the kernels' first step.
 * Flags and status words are device memory that the launcher initialises on the stream:
 *   - finite_flag (uint8, may be NULL): set to 1, then to 0 when check_finite is non-zero and some
 *     stored (rounded) result is inf or nan;
 *   - status (2 x int64, required): status[0] = number of bad elements (non-finite, or
 *     |v * 2^frac_bits| >= 2^62), status[1] = flat index of the first bad element, -1 if none.
 */
#ifndef REVENGINE_CUDA_COUPLING_KERNELS_H
#define REVENGINE_CUDA_COUPLING_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
  REVENGINE_CUDA_FLOAT32 = 0,
  REVENGINE_CUDA_FLOAT64 = 1,
  REVENGINE_CUDA_BFLOAT16 = 2,
  REVENGINE_CUDA_FLOAT16 = 3
};

/* out = fma(lam, x, f) rounded to x's dtype (out may be x). */
int revengine_cuda_coupling_update(void* out, const void* x, int x_dtype, const void* f, int f_dtype, double lam,
                                   int64_t n, void* stream);
/* x <- fma(lam, x, f) */
int revengine_cuda_coupling_update_(void* x, int x_dtype, const void* f, int f_dtype, double lam, int64_t n,
                                    void* stream);
/* y <- (y - f) / lam, with the fused all-finite flag. */
int revengine_cuda_coupling_inverse_(void* y, int y_dtype, const void* f, int f_dtype, double lam, int64_t n,
                                     uint8_t* finite_flag, int check_finite, void* stream);
/* x <- fma(x, scale, shift); scale and shift share the dtype s_dtype. */
int revengine_cuda_affine_update_(void* x, int x_dtype, const void* scale, const void* shift, int s_dtype,
                                  int64_t n, void* stream);
/* y <- (y - shift) / scale, with the fused all-finite flag. */
int revengine_cuda_affine_inverse_(void* y, int y_dtype, const void* scale, const void* shift, int s_dtype,
                                   int64_t n, uint8_t* finite_flag, int check_finite, void* stream);
/* q = round_half_even(double(x) * 2^frac_bits); bad elements are stored as 0 and counted in status. */
int revengine_cuda_fixed_quantize(const void* x, int x_dtype, int64_t* q, int frac_bits, int64_t n, int64_t* status,
                                  void* stream);
/* out = dtype(double(q) * 2^-frac_bits)  (double -> float -> bfloat16/float16). */
int revengine_cuda_fixed_dequantize(const int64_t* q, void* out, int out_dtype, int frac_bits, int64_t n,
                                    void* stream);
/* acc += sign * round_half_even(double(inc) * 2^frac_bits) (wrap-around); bad elements add 0 and are
 * counted in status, so calling again with -sign undoes the call exactly. */
int revengine_cuda_fixed_update_(int64_t* acc, const void* inc, int inc_dtype, int frac_bits, int64_t sign, int64_t n,
                                 int64_t* status, void* stream);
/* BDIA's exact step (csrc/ops.cpp: bdia_step_ when forward != 0, bdia_unstep_ otherwise) on u, src
 * (int64, n elements), inc (n elements of inc_dtype) and sign (int64, n / inner: one per sample, whose
 * elements are the `inner` consecutive ones); low is uint8 [ceil(n / per)], per = 8 / shift for
 * shift 1, 2, 4, else 1: written by the forward, read by the inverse. status counts the bytes of low
 * with a bad increment (non-finite or |inc (1 + g) 2^frac_bits| >= 2^62; it adds 0, so running the
 * other direction undoes a call exactly) and status[1] is the first such byte. */
int revengine_cuda_bdia_step(int64_t* u, const int64_t* src, const void* inc, int inc_dtype, const int64_t* sign,
                             uint8_t* low, int64_t n, int64_t inner, int frac_bits, int shift, int forward,
                             int64_t* status, void* stream);
/* finite_flag <- 1 when every element of x is finite, else 0. */
int revengine_cuda_all_finite(const void* x, int x_dtype, int64_t n, uint8_t* finite_flag, void* stream);

/* cudaGetErrorString for a launcher's return value. */
const char* revengine_cuda_error_string(int err);

#ifdef __cplusplus
}
#endif

#endif /* REVENGINE_CUDA_COUPLING_KERNELS_H */
