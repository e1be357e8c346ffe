//! What callers see on CPU (and in builds without the `cuda` feature): not supported, and a
//! clean error rather than a panic.
use candle_core::{DType, Device, Tensor};

#[test]
fn cpu_is_not_supported() -> candle_core::Result<()> {
    let cpu = Device::Cpu;
    assert!(!icedit_flash_attn::supported(&cpu, DType::BF16, 128));
    assert!(!icedit_flash_attn::supported(&cpu, DType::F16, 128));
    let q = Tensor::zeros((1, 4, 2, 128), DType::BF16, &cpu)?;
    let err = icedit_flash_attn::flash_attn(&q, &q, &q, 0.1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("CUDA device"), "{err}");
    Ok(())
}

#[test]
fn compiled_flag_matches_feature() {
    assert_eq!(icedit_flash_attn::COMPILED, cfg!(feature = "cuda"));
}
