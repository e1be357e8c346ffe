//! The C ABI of kernels/flash_api.cu.
use core::ffi::{c_char, c_int, c_void};

/// `icedit_flash_attn_fwd` statuses below zero (keep in sync with flash_api.cu); zero is
/// success, anything above zero is a `cudaError_t`.
pub(crate) const ERR_HEAD_DIM: c_int = -1;
pub(crate) const ERR_SHAPE: c_int = -2;
pub(crate) const ERR_NULL: c_int = -3;

extern "C" {
    pub(crate) fn icedit_flash_attn_fwd(
        q_ptr: *const c_void,
        k_ptr: *const c_void,
        v_ptr: *const c_void,
        o_ptr: *mut c_void,
        softmax_lse_ptr: *mut f32,

        q_batch_stride: i64,
        k_batch_stride: i64,
        v_batch_stride: i64,
        o_batch_stride: i64,
        q_row_stride: i64,
        k_row_stride: i64,
        v_row_stride: i64,
        o_row_stride: i64,
        q_head_stride: i64,
        k_head_stride: i64,
        v_head_stride: i64,
        o_head_stride: i64,

        b: i32,
        h: i32,
        h_k: i32,
        d: i32,
        seqlen_q: i32,
        seqlen_k: i32,
        softmax_scale: f32,

        is_bf16: i32,
        is_sm8x: i32,
        stream_ptr: *mut c_void,
    ) -> c_int;

    pub(crate) fn icedit_flash_attn_cuda_error_string(err: c_int) -> *const c_char;
}
