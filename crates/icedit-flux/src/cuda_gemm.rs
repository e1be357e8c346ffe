//! Two half-precision matrix products candle has no op for, as single cuBLAS calls
//! (`CUBLAS_COMPUTE_32F`: f32 accumulation):
//! - [`scaled_scores_f32`], attention's `scale * q k^T` with an f32 output, so the scores are
//!   never rounded to the half dtype (flash attention keeps them in f32 too);
//! - [`biased_linear`], `x W^T + b` with the bias added to the f32 accumulator before the one
//!   rounding to the half dtype, as PyTorch's cuBLAS bias epilogue does (`beta * C`, `C` the
//!   bias rows).

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::cublas::{result::gemm_strided_batched_ex, sys};
use candle_core::cuda::cudarc::driver::{
    CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr,
};
use candle_core::cuda::{CudaDType, CudaDevice};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, DType, InplaceOp3, Layout, Result, Shape, Tensor,
};

/// `scale * q k^T` in f32 for contiguous half-precision `q` `[B, H, M, D]` and `k`
/// `[B, H, N, D]`: `[B, H, M, N]`.
pub(crate) fn scaled_scores_f32(q: &Tensor, k: &Tensor, scale: f32) -> Result<Tensor> {
    q.contiguous()?
        .apply_op2_no_bwd(&k.contiguous()?, &ScaledScores { scale })
}

/// `x W^T + b` for half-precision `x` `[M, K]`, `W` `[N, K]` and `b` `[N]`, rounded once.
pub(crate) fn biased_linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (m, n) = (x.dim(0)?, weight.dim(0)?);
    let out = bias
        .to_dtype(x.dtype())?
        .broadcast_as((m, n))?
        .force_contiguous()?;
    out.inplace_op3(&x.contiguous()?, &weight.contiguous()?, &BiasedLinear)?;
    Ok(out)
}

/// One strided batched product in column-major terms, `C = alpha op(A) op(B) + beta C`, with
/// `op(A) = A^T` (`A` stored `[K, M]`, leading dimension K) and `B` stored `[K, N]`: per batch,
/// the row-major product `C^T [N, M] = B^T A`, i.e. `rows(B) x rows(A)^T`.
#[allow(clippy::too_many_arguments)]
fn gemm<T: CudaDType, C: DeviceRepr>(
    device: &CudaDevice,
    a: &CudaView<T>,
    b: &CudaView<T>,
    c: &mut CudaViewMut<C>,
    (batch, m, n, k): (usize, usize, usize, usize),
    (alpha, beta): (f32, f32),
    half: sys::cudaDataType_t,
    c_type: sys::cudaDataType_t,
) -> Result<()> {
    let int = |x: usize| i32::try_from(x).map_err(candle_core::Error::wrap);
    let blas = device.cublas_handle();
    let stream = device.cuda_stream();
    let (a_ptr, _a_sync) = a.device_ptr(&stream);
    let (b_ptr, _b_sync) = b.device_ptr(&stream);
    let (c_ptr, _c_sync) = c.device_ptr_mut(&stream);
    unsafe {
        gemm_strided_batched_ex(
            *blas.handle(),
            sys::cublasOperation_t::CUBLAS_OP_T,
            sys::cublasOperation_t::CUBLAS_OP_N,
            int(m)?,
            int(n)?,
            int(k)?,
            &alpha as *const f32 as *const _,
            a_ptr as *const _,
            half,
            int(k)?,
            (m * k) as i64,
            b_ptr as *const _,
            half,
            int(k)?,
            (n * k) as i64,
            &beta as *const f32 as *const _,
            c_ptr as *mut _,
            c_type,
            int(m)?,
            (m * n) as i64,
            int(batch)?,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
        )
    }
    .map_err(candle_core::Error::wrap)
}

fn half_type(dtype: DType) -> Result<sys::cudaDataType_t> {
    match dtype {
        DType::BF16 => Ok(sys::cudaDataType_t::CUDA_R_16BF),
        DType::F16 => Ok(sys::cudaDataType_t::CUDA_R_16F),
        other => candle_core::bail!("a half-precision product takes bf16 or f16, not {other:?}"),
    }
}

fn contiguous(layouts: &[&Layout], what: &str) -> Result<()> {
    if layouts.iter().all(|l| l.is_contiguous()) {
        Ok(())
    } else {
        candle_core::bail!("{what}: the operands must be contiguous")
    }
}

struct ScaledScores {
    scale: f32,
}

impl CustomOp2 for ScaledScores {
    fn name(&self) -> &'static str {
        "scaled-scores-f32"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("scaled-scores-f32 runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        q_layout: &Layout,
        k: &CudaStorage,
        k_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (b, h, m, d) = q_layout.shape().dims4()?;
        let (kb, kh, n, kd) = k_layout.shape().dims4()?;
        if (kb, kh, kd) != (b, h, d) || q.dtype() != k.dtype() {
            candle_core::bail!(
                "scaled-scores-f32: q {:?} and k {:?} must be [B, H, *, D] alike",
                q_layout.shape(),
                k_layout.shape()
            );
        }
        contiguous(&[q_layout, k_layout], "scaled-scores-f32")?;
        let half = half_type(q.dtype())?;
        let device = q.device().clone();
        let mut out = unsafe { device.alloc::<f32>(b * h * m * n)? };
        macro_rules! run {
            ($t:ty) => {{
                let q = q.as_cuda_slice::<$t>()?.slice(q_layout.start_offset()..);
                let k = k.as_cuda_slice::<$t>()?.slice(k_layout.start_offset()..);
                // Per (batch, head): out [M, N] row-major = rows(q) x rows(k)^T.
                let dims = (b * h, n, m, d);
                gemm(
                    &device,
                    &k,
                    &q,
                    &mut out.slice_mut(..),
                    dims,
                    (self.scale, 0.0),
                    half,
                    sys::cudaDataType_t::CUDA_R_32F,
                )
            }};
        }
        match q.dtype() {
            DType::BF16 => run!(half::bf16)?,
            _ => run!(half::f16)?,
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, device),
            Shape::from((b, h, m, n)),
        ))
    }
}

/// In place on the bias rows `C` `[M, N]`: `C = x W^T + C`.
struct BiasedLinear;

impl InplaceOp3 for BiasedLinear {
    fn name(&self) -> &'static str {
        "biased-linear"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        candle_core::bail!("biased-linear runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        c: &mut CudaStorage,
        c_layout: &Layout,
        x: &CudaStorage,
        x_layout: &Layout,
        w: &CudaStorage,
        w_layout: &Layout,
    ) -> Result<()> {
        let (m, n) = c_layout.shape().dims2()?;
        let (xm, k) = x_layout.shape().dims2()?;
        let (wn, wk) = w_layout.shape().dims2()?;
        if (xm, wn, wk) != (m, n, k) || x.dtype() != w.dtype() || c.dtype() != x.dtype() {
            candle_core::bail!(
                "biased-linear: x {:?}, weight {:?} and bias rows {:?} disagree",
                x_layout.shape(),
                w_layout.shape(),
                c_layout.shape()
            );
        }
        contiguous(&[c_layout, x_layout, w_layout], "biased-linear")?;
        let half = half_type(x.dtype())?;
        let device = x.device().clone();
        macro_rules! run {
            ($t:ty) => {{
                let x = x.as_cuda_slice::<$t>()?.slice(x_layout.start_offset()..);
                let w = w.as_cuda_slice::<$t>()?.slice(w_layout.start_offset()..);
                let c = c.as_cuda_slice_mut::<$t>()?;
                let mut c = c.slice_mut(c_layout.start_offset()..);
                // out [M, N] row-major = rows(x) x rows(W)^T, plus the bias rows already there.
                gemm(
                    &device,
                    &w,
                    &x,
                    &mut c,
                    (1, n, m, k),
                    (1.0, 1.0),
                    half,
                    half,
                )
            }};
        }
        match x.dtype() {
            DType::BF16 => run!(half::bf16),
            _ => run!(half::f16),
        }
    }
}
