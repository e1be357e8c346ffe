/******************************************************************************
 * Copyright (c) 2023, Tri Dao.
 ******************************************************************************/
// Trimmed for icedit-flash-attn from candle-flash-attn 0.11.1's kernels/flash_fwd_launch_template.h
// (itself from flash-attention v2, csrc/flash_attn/src/flash_fwd_launch_template.h).
// Kept: the non-split forward kernel for head dim 128, not causal, no dropout, no alibi, no
// softcap, no local window, no returned softmax, even K (d == 128): the only compile-time
// switch left is Is_even_MN (seqlen_q % kBlockM == 0 && seqlen_k % kBlockN == 0).
// Removed: split-KV / paged / combine kernels, every other head dim, hardware_info.h (its
// CHECK_CUDA calls exit()); launch errors are returned to the caller instead of being dropped.

#pragma once

#include <cuda_runtime.h>

#include "flash.h"
#include "flash_fwd_kernel.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define ARCH_SUPPORTS_FLASH
#define KERNEL_PARAM_MODIFIER __grid_constant__
#else
#define KERNEL_PARAM_MODIFIER
#endif

// Everything host-visible lives in its own namespace so that a binary linking both this crate and
// candle-flash-attn (same upstream templates) gets no clashing weak symbols.
namespace icedit_fa {

template<typename Kernel_traits, bool Is_dropout, bool Is_causal, bool Is_local, bool Has_alibi, bool Is_even_MN, bool Is_even_K, bool Is_softcap, bool Return_softmax>
__global__ void flash_fwd_kernel(KERNEL_PARAM_MODIFIER const Flash_fwd_params params) {
    #if defined(ARCH_SUPPORTS_FLASH)
        static_assert(!(Is_causal && Is_local)); // Enforce constraints
        flash::compute_attn<Kernel_traits, Is_dropout, Is_causal, Is_local, Has_alibi, Is_even_MN, Is_even_K, Is_softcap, Return_softmax>(params);
    #else
        printf("FATAL: FlashAttention requires building with sm version sm80-sm90, but was built for < 8.0!");
    #endif
}

template<typename Kernel_traits>
cudaError_t run_flash_fwd(Flash_fwd_params &params, cudaStream_t stream) {
    constexpr size_t smem_size = Kernel_traits::kSmemSize;
    const int num_m_block = (params.seqlen_q + Kernel_traits::kBlockM - 1) / Kernel_traits::kBlockM;
    dim3 grid(num_m_block, params.b, params.h);
    const bool is_even_MN = params.cu_seqlens_q == nullptr && params.cu_seqlens_k == nullptr
        && params.seqlen_k % Kernel_traits::kBlockN == 0 && params.seqlen_q % Kernel_traits::kBlockM == 0;
    auto launch = [&](auto kernel) -> cudaError_t {
        if (smem_size >= 48 * 1024) {
            cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_size);
            if (err != cudaSuccess) { return err; }
        }
        kernel<<<grid, Kernel_traits::kNThreads, smem_size, stream>>>(params);
        return cudaGetLastError();
    };
    //                                          Is_dropout Is_causal Is_local Has_alibi Is_even_MN Is_even_K Is_softcap Return_softmax
    if (is_even_MN) {
        return launch(&flash_fwd_kernel<Kernel_traits, false,   false,    false,   false,    true,      true,     false,     false>);
    } else {
        return launch(&flash_fwd_kernel<Kernel_traits, false,   false,    false,   false,    false,     true,     false,     false>);
    }
}

// Upstream run_mha_fwd_hdim128, non-dropout branch. `sm8x` is the device's compute capability
// 8.x with x > 0 (sm86/sm89): there 128 x 32 tiles (48 KB smem, 2 CTAs per SM) are fastest for
// non-causal; A100/H100 use 128 x 64. Builds for sm_90 and newer cannot run on sm8x devices,
// so ICEDIT_FLASH_SM8X (set by build.rs for CUDA_COMPUTE_CAP < 90) gates the 128 x 32 variant.
template<typename T>
cudaError_t run_mha_fwd_hdim128(Flash_fwd_params &params, cudaStream_t stream, bool sm8x) {
    constexpr static int Headdim = 128;
#if defined(ICEDIT_FLASH_SM8X)
    if (sm8x) {
        return run_flash_fwd<Flash_fwd_kernel_traits<Headdim, 128, 32, 4, false, false, T>>(params, stream);
    }
#else
    (void)sm8x;
#endif
    return run_flash_fwd<Flash_fwd_kernel_traits<Headdim, 128, 64, 4, false, false, T>>(params, stream);
}

}  // namespace icedit_fa

// Defined in flash_fwd_hdim128_{bf16,fp16}_sm80.cu (one dtype per translation unit).
template<typename T>
cudaError_t run_mha_fwd_hdim128_noncausal(Flash_fwd_params &params, cudaStream_t stream, bool sm8x);
