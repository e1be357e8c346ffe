//! Flash attention v2 forward for FLUX: head dim 128, bf16/f16, non-causal, on CUDA devices of
//! compute capability 8.0 or newer. The kernels are flash-attention v2's, vendored and trimmed
//! from candle-flash-attn 0.11.1 (see README.md).
//!
//! Without the `cuda` feature nothing is compiled: [`supported`] returns false and
//! [`flash_attn`] returns an error, so callers can always fall back to their own attention.
//!
//! ```no_run
//! # use candle_core::{Tensor, Result};
//! # fn attn(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
//! // q, k, v: [batch, seq, heads, 128]
//! let scale = 1.0 / (128f32).sqrt();
//! if icedit_flash_attn::supported(q.device(), q.dtype(), q.dim(3)?) {
//!     return icedit_flash_attn::flash_attn(q, k, v, scale); // [batch, seq_q, heads, 128]
//! }
//! # unimplemented!()
//! # }
//! ```

use candle_core::{bail, DType, Device, Result, Tensor};

/// The only head dimension the compiled kernels handle.
pub const HEAD_DIM: usize = 128;

/// Whether the kernels were compiled in (the `cuda` feature).
pub const COMPILED: bool = cfg!(feature = "cuda");

#[cfg(feature = "cuda")]
mod ffi;

/// True when [`flash_attn`] can run on this device for this dtype and head dim: the crate was
/// built with `cuda`, `device` is a CUDA device of compute capability >= 8.0, `dtype` is bf16 or
/// f16 and `head_dim` is 128.
pub fn supported(device: &Device, dtype: DType, head_dim: usize) -> bool {
    head_dim == HEAD_DIM
        && matches!(dtype, DType::BF16 | DType::F16)
        && imp::compute_capability(device).is_ok_and(|(major, _)| major >= 8)
}

/// Non-causal scaled dot-product attention `softmax(q k^T * softmax_scale) v`, computed per head.
///
/// `q` is `[batch, seq_q, heads, 128]`, `k` and `v` are `[batch, seq_k, heads_k, 128]` with
/// `heads % heads_k == 0` (grouped-query attention when `heads_k < heads`); all three bf16 or all
/// f16, on one CUDA device, with a contiguous last dimension (other strides are free). Returns a
/// new contiguous `[batch, seq_q, heads, 128]` tensor of the same dtype. Same layout and
/// semantics as `candle_flash_attn::flash_attn(q, k, v, softmax_scale, false)`. No backward.
pub fn flash_attn(q: &Tensor, k: &Tensor, v: &Tensor, softmax_scale: f32) -> Result<Tensor> {
    for (name, t) in [("q", q), ("k", k), ("v", v)] {
        if !t.device().is_cuda() {
            bail!(
                "icedit-flash-attn: {name} is on {:?}; flash attention needs a CUDA device",
                t.device()
            )
        }
    }
    if !q.device().same_device(k.device()) || !q.device().same_device(v.device()) {
        bail!("icedit-flash-attn: q, k and v must be on the same CUDA device")
    }
    let dtype = q.dtype();
    if !matches!(dtype, DType::BF16 | DType::F16) {
        bail!("icedit-flash-attn: dtype {dtype:?} is not supported, only bf16 and f16")
    }
    if k.dtype() != dtype || v.dtype() != dtype {
        bail!(
            "icedit-flash-attn: mismatched dtypes q {dtype:?}, k {:?}, v {:?}",
            k.dtype(),
            v.dtype()
        )
    }
    let (b, seq_q, heads, d) = q.dims4()?;
    let (b_k, seq_k, heads_k, d_k) = k.dims4()?;
    if d != HEAD_DIM || d_k != HEAD_DIM || v.dim(3)? != HEAD_DIM {
        bail!(
            "icedit-flash-attn: only head dim {HEAD_DIM} is compiled in (q {:?}, k {:?}, v {:?})",
            q.shape(),
            k.shape(),
            v.shape()
        )
    }
    if b_k != b || v.dims4()? != (b, seq_k, heads_k, d) {
        bail!(
            "icedit-flash-attn: shape mismatch q {:?}, k {:?}, v {:?} (want k, v [batch, seq_k, heads_k, {HEAD_DIM}])",
            q.shape(),
            k.shape(),
            v.shape()
        )
    }
    if heads_k == 0 || heads % heads_k != 0 {
        bail!("icedit-flash-attn: k/v heads {heads_k} must divide q heads {heads}")
    }
    if b == 0 || seq_q == 0 || seq_k == 0 || heads == 0 {
        bail!(
            "icedit-flash-attn: empty input (q {:?}, k {:?})",
            q.shape(),
            k.shape()
        )
    }
    for (name, t) in [("q", q), ("k", k), ("v", v)] {
        if t.stride()[3] != 1 {
            bail!(
                "icedit-flash-attn: the last dim of {name} must be contiguous (stride {:?})",
                t.stride()
            )
        }
    }
    let (major, minor) = imp::compute_capability(q.device())?;
    if major < 8 {
        bail!(
            "icedit-flash-attn: compute capability {major}.{minor} is below 8.0; flash attention needs sm80 or newer"
        )
    }
    imp::flash_attn(q, k, v, softmax_scale, major == 8 && minor > 0)
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use candle_core::{bail, Device, Result, Tensor};

    pub(crate) fn compute_capability(device: &Device) -> Result<(i32, i32)> {
        bail!("icedit-flash-attn was built without its `cuda` feature (device {device:?})")
    }

    pub(crate) fn flash_attn(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: f32,
        _: bool,
    ) -> Result<Tensor> {
        bail!("icedit-flash-attn was built without its `cuda` feature")
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use crate::ffi;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
    use candle_core::cuda_backend::{CudaDType, CudaStorage};
    use candle_core::{bail, CpuStorage, DType, Device, Layout, Result, Shape, Tensor};
    use core::ffi::c_void;

    pub(crate) fn compute_capability(device: &Device) -> Result<(i32, i32)> {
        let Device::Cuda(dev) = device else {
            bail!("icedit-flash-attn: {device:?} is not a CUDA device")
        };
        let stream = dev.cuda_stream();
        let ctx = stream.context();
        let attr = |a| {
            ctx.attribute(a)
                .map_err(|e| candle_core::Error::Cuda(Box::new(e)))
        };
        Ok((
            attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        ))
    }

    pub(crate) fn flash_attn(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        softmax_scale: f32,
        sm8x: bool,
    ) -> Result<Tensor> {
        q.apply_op3_no_bwd(
            k,
            v,
            &FlashAttn {
                softmax_scale,
                sm8x,
            },
        )
    }

    struct FlashAttn {
        softmax_scale: f32,
        sm8x: bool,
    }

    fn to_i32(x: usize, what: &str) -> Result<i32> {
        i32::try_from(x).map_err(|_| {
            candle_core::Error::Msg(format!("icedit-flash-attn: {what} {x} overflows i32"))
        })
    }

    impl FlashAttn {
        #[allow(clippy::too_many_arguments)]
        fn fwd<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
            &self,
            q: &CudaStorage,
            q_l: &Layout,
            k: &CudaStorage,
            k_l: &Layout,
            v: &CudaStorage,
            v_l: &Layout,
            is_bf16: bool,
        ) -> Result<(CudaStorage, Shape)> {
            let dev = q.device();
            // Shapes were checked by crate::flash_attn; re-check what the kernel relies on.
            let (b, seq_q, heads, d) = q_l.shape().dims4()?;
            let (_, seq_k, heads_k, _) = k_l.shape().dims4()?;
            let (qs, ks, vs) = (q_l.stride(), k_l.stride(), v_l.stride());
            if qs[3] != 1 || ks[3] != 1 || vs[3] != 1 {
                bail!("icedit-flash-attn: the last dim of q, k and v must be contiguous")
            }
            let out_shape = q_l.shape().clone();
            let os = Layout::contiguous(&out_shape).stride().to_vec();

            let q = q.as_cuda_slice::<T>()?.slice(q_l.start_offset()..);
            let k = k.as_cuda_slice::<T>()?.slice(k_l.start_offset()..);
            let v = v.as_cuda_slice::<T>()?.slice(v_l.start_offset()..);
            let stream = dev.cuda_stream();
            // SAFETY: the kernel writes every element of `dst` and `lse` (rows < seq_q, all heads).
            let mut dst = unsafe { dev.alloc::<T>(out_shape.elem_count())? };
            let mut lse = unsafe { dev.alloc::<f32>(b * heads * seq_q)? };

            let status = {
                let (q_ptr, _g1) = q.device_ptr(&stream);
                let (k_ptr, _g2) = k.device_ptr(&stream);
                let (v_ptr, _g3) = v.device_ptr(&stream);
                let (o_ptr, _g4) = dst.device_ptr_mut(&stream);
                let (lse_ptr, _g5) = lse.device_ptr_mut(&stream);
                let st = |s: usize| s as i64;
                // SAFETY: pointers are live device allocations on `stream` for the duration of
                // the (asynchronous, stream-ordered) launch; strides describe their layouts.
                unsafe {
                    ffi::icedit_flash_attn_fwd(
                        q_ptr as *const c_void,
                        k_ptr as *const c_void,
                        v_ptr as *const c_void,
                        o_ptr as *mut c_void,
                        lse_ptr as *mut f32,
                        st(qs[0]),
                        st(ks[0]),
                        st(vs[0]),
                        st(os[0]),
                        st(qs[1]),
                        st(ks[1]),
                        st(vs[1]),
                        st(os[1]),
                        st(qs[2]),
                        st(ks[2]),
                        st(vs[2]),
                        st(os[2]),
                        to_i32(b, "batch")?,
                        to_i32(heads, "heads")?,
                        to_i32(heads_k, "k/v heads")?,
                        to_i32(d, "head dim")?,
                        to_i32(seq_q, "seq_q")?,
                        to_i32(seq_k, "seq_k")?,
                        self.softmax_scale,
                        is_bf16 as i32,
                        self.sm8x as i32,
                        stream.cu_stream() as *mut c_void,
                    )
                }
            };
            match status {
                0 => {}
                ffi::ERR_HEAD_DIM => {
                    bail!("icedit-flash-attn: head dim {d} is not compiled in (only 128)")
                }
                ffi::ERR_SHAPE => bail!(
                    "icedit-flash-attn: unsupported shape q {:?} k {:?}",
                    q_l.shape(),
                    k_l.shape()
                ),
                ffi::ERR_NULL => bail!("icedit-flash-attn: null device pointer"),
                err => {
                    // SAFETY: cudaGetErrorString returns a static NUL-terminated string.
                    let msg = unsafe {
                        std::ffi::CStr::from_ptr(ffi::icedit_flash_attn_cuda_error_string(err))
                    };
                    bail!(
                        "icedit-flash-attn: kernel launch failed: CUDA error {err}: {}",
                        msg.to_string_lossy()
                    )
                }
            }
            // `lse` is freed stream-ordered (after the kernel) when it drops here.
            Ok((CudaStorage::wrap_cuda_slice(dst, dev.clone()), out_shape))
        }
    }

    impl candle_core::CustomOp3 for FlashAttn {
        fn name(&self) -> &'static str {
            "icedit-flash-attn"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            bail!("icedit-flash-attn: no CPU implementation")
        }

        fn cuda_fwd(
            &self,
            q: &CudaStorage,
            q_l: &Layout,
            k: &CudaStorage,
            k_l: &Layout,
            v: &CudaStorage,
            v_l: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
                bail!("icedit-flash-attn: mismatched dtypes")
            }
            match q.dtype() {
                DType::F16 => self.fwd::<half::f16>(q, q_l, k, k_l, v, v_l, false),
                DType::BF16 => self.fwd::<half::bf16>(q, q_l, k, k_l, v, v_l, true),
                dt => bail!("icedit-flash-attn: dtype {dt:?} is not supported, only bf16 and f16"),
            }
        }
    }
}
