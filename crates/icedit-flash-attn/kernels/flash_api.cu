// Trimmed for icedit-flash-attn from candle-flash-attn 0.11.1's kernels/flash_api.cu
// (Copyright (c) Tri Dao and the candle authors; see ../README.md and ../LICENSE-*).
// Dispatches only the forward kernel for head dim 128, bf16/fp16, not causal: no alibi, no
// dropout, no softcap, no local window, no split-KV, no paged KV, no varlen. Anything else is
// rejected with a negative status; a CUDA error is returned as its (positive) cudaError_t.

#include <cmath>
#include <cstring>
#include <cstdint>

#include <cuda_runtime.h>
#include <cutlass/numeric_types.h>

#include "flash.h"

// Defined in flash_fwd_hdim128_{bf16,fp16}_sm80.cu (see flash_fwd_launch_template.h). Not
// including the launch template here keeps this file free of CuTe and fast to compile.
template<typename T>
cudaError_t run_mha_fwd_hdim128_noncausal(Flash_fwd_params &params, cudaStream_t stream, bool sm8x);

// Negative statuses; keep in sync with src/ffi.rs.
#define ICEDIT_FA_ERR_HEAD_DIM   (-1)  // d != 128
#define ICEDIT_FA_ERR_SHAPE      (-2)  // b, h, h_k or a seqlen <= 0, or h % h_k != 0
#define ICEDIT_FA_ERR_NULL       (-3)  // a null q/k/v/o/lse pointer

extern "C" int icedit_flash_attn_fwd(
    const void *q_ptr,
    const void *k_ptr,
    const void *v_ptr,
    void *o_ptr,
    float *softmax_lse_ptr,   // [b, h, seqlen_q], written by the kernel

    // Strides in elements, not bytes. The last (head) dim must be contiguous.
    int64_t q_batch_stride,
    int64_t k_batch_stride,
    int64_t v_batch_stride,
    int64_t o_batch_stride,
    int64_t q_row_stride,
    int64_t k_row_stride,
    int64_t v_row_stride,
    int64_t o_row_stride,
    int64_t q_head_stride,
    int64_t k_head_stride,
    int64_t v_head_stride,
    int64_t o_head_stride,

    int32_t b,
    int32_t h,
    int32_t h_k,
    int32_t d,
    int32_t seqlen_q,
    int32_t seqlen_k,
    float softmax_scale,

    int32_t is_bf16,
    int32_t is_sm8x,     // compute capability 8.x with x > 0 (tile choice only)
    void *stream_ptr
) {
    if (d != 128) { return ICEDIT_FA_ERR_HEAD_DIM; }
    if (b <= 0 || h <= 0 || h_k <= 0 || seqlen_q <= 0 || seqlen_k <= 0 || h % h_k != 0) {
        return ICEDIT_FA_ERR_SHAPE;
    }
    if (q_ptr == nullptr || k_ptr == nullptr || v_ptr == nullptr || o_ptr == nullptr || softmax_lse_ptr == nullptr) {
        return ICEDIT_FA_ERR_NULL;
    }

    Flash_fwd_params params;
    memset(&params, 0, sizeof(params));

    params.q_ptr = const_cast<void *>(q_ptr);
    params.k_ptr = const_cast<void *>(k_ptr);
    params.v_ptr = const_cast<void *>(v_ptr);
    params.o_ptr = o_ptr;
    params.softmax_lse_ptr = softmax_lse_ptr;
    params.alibi_slopes_ptr = nullptr;

    params.q_batch_stride = q_batch_stride;
    params.k_batch_stride = k_batch_stride;
    params.v_batch_stride = v_batch_stride;
    params.o_batch_stride = o_batch_stride;
    params.q_row_stride = q_row_stride;
    params.k_row_stride = k_row_stride;
    params.v_row_stride = v_row_stride;
    params.o_row_stride = o_row_stride;
    params.q_head_stride = q_head_stride;
    params.k_head_stride = k_head_stride;
    params.v_head_stride = v_head_stride;
    params.o_head_stride = o_head_stride;

    auto round_up = [](int x, int m) { return (x + m - 1) / m * m; };
    params.b = b;
    params.h = h;
    params.h_k = h_k;
    params.h_h_k_ratio = h / h_k;
    params.seqlen_q = seqlen_q;
    params.seqlen_k = seqlen_k;
    params.seqlen_q_rounded = round_up(seqlen_q, 128);
    params.seqlen_k_rounded = round_up(seqlen_k, 128);
    params.total_q = b * seqlen_q;
    params.d = d;
    params.d_rounded = round_up(d, 32);

    // No softcap.
    params.softcap = 0.0f;
    params.scale_softmax = softmax_scale;
    params.scale_softmax_log2 = softmax_scale * float(M_LOG2E);

    // No dropout: probability to keep = 1.
    params.p_dropout = 1.f;
    params.p_dropout_in_uint8_t = uint8_t(std::floor(params.p_dropout * 255.0));
    params.rp_dropout = 1.f / params.p_dropout;
    params.scale_softmax_rp_dropout = params.rp_dropout * params.scale_softmax;

    params.is_bf16 = is_bf16 != 0;
    params.cu_seqlens_q = nullptr;  // no varlen
    params.cu_seqlens_k = nullptr;
    params.seqused_k = nullptr;
    params.p_ptr = nullptr;         // no returned softmax
    params.block_table = nullptr;   // no paged KV
    params.mm_prefix_ranges = nullptr;

    params.is_causal = false;
    params.window_size_left = -1;   // no local window
    params.window_size_right = -1;

    params.is_seqlens_k_cumulative = true;
    params.num_splits = 1;          // no split-KV
    params.unpadded_lse = false;

    cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_ptr);
    const bool sm8x = is_sm8x != 0;
    cudaError_t err = params.is_bf16
        ? run_mha_fwd_hdim128_noncausal<cutlass::bfloat16_t>(params, stream, sm8x)
        : run_mha_fwd_hdim128_noncausal<cutlass::half_t>(params, stream, sm8x);
    return static_cast<int>(err);
}

extern "C" const char *icedit_flash_attn_cuda_error_string(int err) {
    return cudaGetErrorString(static_cast<cudaError_t>(err));
}
