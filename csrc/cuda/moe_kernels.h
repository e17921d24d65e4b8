/* CUDA kernels of revengine's MoE routing ops (the CUDA twins of csrc/moe_ops.cpp), behind plain C
 * launchers. This header and moe_kernels.cu do not depend on torch: the torch glue is
 * moe_ops_cuda.cpp. Layout as in csrc/moe_ops.h: T tokens, k choices each, n = T*k slots
 * s = t*k + j, E experts; sorted_slots int64 [n], expert_offsets int64 [E+1].
 *
 * Conventions for every launcher:
 *   - tensors are contiguous device buffers; row-major [rows, H] for activations; no output
 *     aliases an input;
 *   - `stream` is a cudaStream_t (NULL: the legacy default stream); the work is queued on it and
 *     nothing synchronises;
 *   - the return value is a cudaError_t (0 = cudaSuccess); an unsupported dtype code or a bad
 *     size / missing workspace gives cudaErrorInvalidValue (1) and queues nothing;
 *   - float dtype codes are the REVENGINE_CUDA_FLOAT32/FLOAT64/BFLOAT16/FLOAT16 constants of
 *     coupling_kernels.h; index dtype codes (topk_ids) are REVENGINE_CUDA_INT16/INT32/INT64 below;
 *   - "opmath" buffers (routing weights, their gradient) are float64 for float64 activations and
 *     float32 for float32/bfloat16/float16 activations, as on the CPU;
 *   - sums run in opmath with a fixed order (j = 0..k-1), every product and sum explicitly rounded
 *     (no FMA contraction), so gather/gather_backward/scatter_combine and grad_y agree with the CPU
 *     kernels bit for bit; grad_weights' dot products are a warp tree reduction (a different
 *     summation order than the CPU's sequential loop).
 * Index values are NOT validated (that would need a host synchronisation): the kernels never read
 * or write out of bounds whatever the indices are, but the results for invalid indices are
 * unspecified (see each launcher).
 */
#ifndef REVENGINE_CUDA_MOE_KERNELS_H
#define REVENGINE_CUDA_MOE_KERNELS_H

#include <stdint.h>

#include "coupling_kernels.h" /* float dtype codes, revengine_cuda_error_string */

#ifdef __cplusplus
extern "C" {
#endif

enum { REVENGINE_CUDA_INT16 = 16, REVENGINE_CUDA_INT32 = 17, REVENGINE_CUDA_INT64 = 18 };

/* Bytes of device workspace revengine_cuda_moe_permute needs for n slots and num_experts experts
 * (0 when n == 0; -1 for invalid sizes). */
int64_t revengine_cuda_moe_permute_workspace(int64_t n, int64_t num_experts);

/* Stable counting sort of the n = T*k slots by expert: topk_ids [n] (flattened [T, k]) ->
 * sorted_slots [n] (ascending slot within an expert) and expert_offsets [num_experts + 1].
 * `workspace` holds at least revengine_cuda_moe_permute_workspace(n, num_experts) bytes (may be
 * NULL when that is 0). An id outside [0, num_experts) goes to an extra bucket after the last
 * expert: sorted_slots is still a permutation of [0, n), and expert_offsets[E] is then the number
 * of valid slots (< n), which the grouped matmuls reject. The result does not depend on the GPU. */
int revengine_cuda_moe_permute(const void* topk_ids, int id_dtype, int64_t n, int64_t num_experts,
                               int64_t* sorted_slots, int64_t* expert_offsets, void* workspace,
                               int64_t workspace_bytes, void* stream);

/* out [n, H] with out[i] = x[sorted_slots[i] / k] (a bitwise row copy; x is [n / k, H]).
 * A slot outside [0, n) gives a zero row. */
int revengine_cuda_moe_gather(const void* x, int dtype, const int64_t* sorted_slots, int64_t n, int64_t k, int64_t H,
                              void* out, void* stream);

/* dx [n / k, H] with dx[t] = sum_{j = 0..k-1} grad_out[pos(t*k + j)] (opmath sums), where pos is the
 * inverse of sorted_slots, built in `pos_workspace` (int64 [n]). A slot with no position
 * contributes nothing. */
int revengine_cuda_moe_gather_backward(const void* grad_out, int dtype, const int64_t* sorted_slots, int64_t n,
                                       int64_t k, int64_t H, void* dx, int64_t* pos_workspace, void* stream);

/* out [T, H] with out[t] = sum_{j = 0..k-1} weights[t*k + j] * y[pos(t*k + j)] (opmath sums);
 * y [T*k, H] of `dtype`, weights opmath [T*k], pos built in `pos_workspace` (int64 [T*k]). */
int revengine_cuda_moe_scatter_combine(const void* y, int dtype, const void* weights, const int64_t* sorted_slots,
                                       int64_t T, int64_t k, int64_t H, void* out, int64_t* pos_workspace,
                                       void* stream);

/* Backward of scatter_combine, one pass over the rows i of y (no inverse permutation needed):
 * grad_y[i] = weights[s] * grad_out[s / k] and grad_weights[s] = dot(grad_out[s / k], y[i]) with
 * s = sorted_slots[i]; grad_out [T, H] and y/grad_y [T*k, H] of `dtype`, weights and
 * grad_weights opmath [T*k]. grad_weights is zeroed first; a slot outside [0, T*k) gives a zero
 * row of grad_y. */
int revengine_cuda_moe_scatter_combine_backward(const void* grad_out, const void* y, int dtype, const void* weights,
                                                const int64_t* sorted_slots, int64_t T, int64_t k, int64_t H,
                                                void* grad_y, void* grad_weights, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* REVENGINE_CUDA_MOE_KERNELS_H */
