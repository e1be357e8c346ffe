//! Flash attention against a plain f32 reference on a real GPU. Compiled only with the `cuda`
//! feature; without a CUDA device (or driver) each test prints a loud skip notice and passes.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Result, Tensor, D};

fn cuda_device() -> Option<Device> {
    // A missing driver can surface as a panic from the dynamic loader as well as an Err.
    match std::panic::catch_unwind(|| Device::new_cuda(0)) {
        Ok(Ok(dev)) => Some(dev),
        Ok(Err(e)) => {
            eprintln!("\n!!!!!!!! icedit-flash-attn: skipped: no CUDA device ({e}) !!!!!!!!\n");
            None
        }
        Err(_) => {
            eprintln!("\n!!!!!!!! icedit-flash-attn: skipped: no CUDA device (driver panicked) !!!!!!!!\n");
            None
        }
    }
}

/// softmax(q k^T * scale) v in f32, per head; q/k/v `[b, s, h, d]`, result `[b, s_q, h, d]`.
fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let t = |x: &Tensor| x.to_dtype(DType::F32)?.transpose(1, 2)?.contiguous();
    let (q, k, v) = (t(q)?, t(k)?, t(v)?);
    let s = (q.matmul(&k.t()?)? * scale)?;
    let m = s.max_keepdim(D::Minus1)?;
    let p = s.broadcast_sub(&m)?.exp()?;
    let p = p.broadcast_div(&p.sum_keepdim(D::Minus1)?)?;
    p.matmul(&v)?.transpose(1, 2)?.contiguous()
}

/// Max and mean absolute difference.
fn diff(a: &Tensor, b: &Tensor) -> Result<(f32, f32)> {
    let d = (a.to_dtype(DType::F32)? - b)?.abs()?.flatten_all()?;
    Ok((
        d.max(0)?.to_scalar::<f32>()?,
        d.mean(0)?.to_scalar::<f32>()?,
    ))
}

// Tolerances. The inputs are rounded to bf16/f16 once and the reference gets the same rounded
// values, so the only differences are (a) the kernel rounding the fp32 softmax probabilities P
// to the input dtype before the P·V tensor-core GEMM and (b) rounding the output to the input
// dtype (accumulation order and fast-math exp2 add ~1e-6). With unit ulp u (bf16 2^-8, f16
// 2^-11), (a) is at most u/2 · Σ p_j |v_j| ≤ u/2 · max|v| and (b) at most u/2 · |o| ≤ u/2 ·
// max|v|; for N(0, 1) values max|v| < 5 over these sizes, so |err| ≤ 5u: 0.0195 for bf16,
// 0.0024 for f16. The mean error is far smaller (errors are independent and |o| ~ 0.1), which
// catches a systematic bug that a max bound alone might let through.
fn tolerances(dtype: DType) -> (f32, f32) {
    match dtype {
        DType::BF16 => (2.0e-2, 2.0e-3),
        DType::F16 => (2.5e-3, 3.0e-4),
        _ => unreachable!(),
    }
}

fn check(
    dev: &Device,
    dtype: DType,
    b: usize,
    seq_q: usize,
    seq_k: usize,
    heads: usize,
    strided_q: bool,
) -> Result<()> {
    let d = 128;
    let scale = 1.0 / (d as f64).sqrt();
    let q = if strided_q {
        // q as a view into a packed [b, s, 3, h, d] tensor: rows and heads strided, d contiguous.
        Tensor::randn(0f32, 1.0, (b, seq_q, 3, heads, d), dev)?
            .to_dtype(dtype)?
            .narrow(2, 1, 1)?
            .squeeze(2)?
    } else {
        Tensor::randn(0f32, 1.0, (b, seq_q, heads, d), dev)?.to_dtype(dtype)?
    };
    let k = Tensor::randn(0f32, 1.0, (b, seq_k, heads, d), dev)?.to_dtype(dtype)?;
    let v = Tensor::randn(0f32, 1.0, (b, seq_k, heads, d), dev)?.to_dtype(dtype)?;
    assert_eq!(q.is_contiguous(), !strided_q);

    let out = icedit_flash_attn::flash_attn(&q, &k, &v, scale as f32)?;
    assert_eq!(out.dims(), &[b, seq_q, heads, d]);
    assert_eq!(out.dtype(), dtype);
    let want = reference(&q, &k, &v, scale)?;
    let (max_err, mean_err) = diff(&out, &want)?;
    let mean_abs = want.abs()?.flatten_all()?.mean(0)?.to_scalar::<f32>()?;
    let (max_tol, mean_tol) = tolerances(dtype);
    eprintln!(
        "{dtype:?} b={b} seq_q={seq_q} seq_k={seq_k} heads={heads} strided_q={strided_q}: \
         max err {max_err:.2e} (tol {max_tol:.1e}), mean err {mean_err:.2e} (tol {mean_tol:.1e}), mean |o| {mean_abs:.3}"
    );
    assert!(
        max_err.is_finite() && max_err <= max_tol,
        "max error {max_err} > {max_tol}"
    );
    assert!(mean_err <= mean_tol, "mean error {mean_err} > {mean_tol}");
    assert!(
        mean_abs > 10.0 * mean_tol,
        "reference output too small to be a meaningful check"
    );
    Ok(())
}

#[test]
fn matches_f32_reference() -> Result<()> {
    let Some(dev) = cuda_device() else {
        return Ok(());
    };
    assert!(
        icedit_flash_attn::supported(&dev, DType::BF16, 128),
        "H100/A100-class device expected"
    );
    for dtype in [DType::BF16, DType::F16] {
        // 300 and 77 are not multiples of the 128 x 64 (or 128 x 32) tile: the masked path.
        check(&dev, dtype, 1, 300, 300, 3, false)?;
        check(&dev, dtype, 2, 77, 77, 3, false)?;
        check(&dev, dtype, 1, 300, 77, 3, true)?;
        check(&dev, dtype, 2, 77, 300, 3, false)?;
        // A multiple of the tile: the even (unmasked) kernel.
        check(&dev, dtype, 1, 256, 128, 3, false)?;
    }
    Ok(())
}

#[test]
fn rejects_what_is_not_compiled_in() -> Result<()> {
    let Some(dev) = cuda_device() else {
        return Ok(());
    };
    let err = |r: Result<Tensor>| r.expect_err("expected an error").to_string();

    assert!(!icedit_flash_attn::supported(&dev, DType::BF16, 64));
    assert!(!icedit_flash_attn::supported(&dev, DType::F32, 128));
    let q64 = Tensor::zeros((1, 77, 3, 64), DType::BF16, &dev)?;
    let e = err(icedit_flash_attn::flash_attn(&q64, &q64, &q64, 0.125));
    assert!(e.contains("head dim"), "{e}");

    let q32 = Tensor::zeros((1, 77, 3, 128), DType::F32, &dev)?;
    let e = err(icedit_flash_attn::flash_attn(&q32, &q32, &q32, 0.1));
    assert!(e.contains("F32"), "{e}");

    let qb = Tensor::zeros((1, 77, 3, 128), DType::BF16, &dev)?;
    let qh = Tensor::zeros((1, 77, 3, 128), DType::F16, &dev)?;
    let e = err(icedit_flash_attn::flash_attn(&qb, &qh, &qb, 0.1));
    assert!(e.contains("mismatched dtypes"), "{e}");

    // [1, 77, 128, 3] transposed to [1, 77, 3, 128]: the last dim has stride 3.
    let t = Tensor::zeros((1, 77, 128, 3), DType::BF16, &dev)?.transpose(2, 3)?;
    let e = err(icedit_flash_attn::flash_attn(&t, &qb, &qb, 0.1));
    assert!(e.contains("contiguous"), "{e}");

    let cpu = Tensor::zeros((1, 77, 3, 128), DType::BF16, &Device::Cpu)?;
    let e = err(icedit_flash_attn::flash_attn(&cpu, &cpu, &cpu, 0.1));
    assert!(e.contains("CUDA device"), "{e}");
    Ok(())
}
