//! `TorchGenerator` against `torch.randn` on a CPU generator, bit for bit.
//!
//! Fixtures: tests/fixtures/torch_randn/, written by tests/reference/gen_torch_randn.py
//! (torch on x86 with the AVX2/AVX-512 kernels).

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use icedit_pipeline::torch_rng::TorchGenerator;
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    torch: String,
    cpu_capability: String,
    cases: Vec<Case>,
    checksums: Vec<Checksum>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    seed: u64,
    draws: Vec<Draw>,
}

#[derive(Deserialize)]
struct Draw {
    key: String,
    shape: Vec<usize>,
    dtype: String,
}

#[derive(Deserialize)]
struct Checksum {
    seed: u64,
    shape: Vec<usize>,
    dtype: String,
    checksum: u64,
}

fn fixture_dir() -> PathBuf {
    icedit_test_support::fixture("torch_randn")
}

fn load_fixture() -> (Fixture, Vec<u8>) {
    let dir = fixture_dir();
    let json = std::fs::read_to_string(dir.join("cases.json")).expect("read cases.json");
    let fixture: Fixture = serde_json::from_str(&json).expect("parse cases.json");
    let tensors = std::fs::read(dir.join("randn.safetensors")).expect("read randn.safetensors");
    (fixture, tensors)
}

fn dtype_of(name: &str) -> DType {
    match name {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        other => panic!("unknown dtype {other} in the fixture"),
    }
}

/// The tensor's elements as f64 plus their raw bits (u32 for f32, u16 for bf16/f16).
fn values_and_bits(t: &Tensor) -> (Vec<f64>, Vec<u32>) {
    let flat = t.flatten_all().expect("flatten");
    match t.dtype() {
        DType::F32 => {
            let v = flat.to_vec1::<f32>().expect("f32 values");
            (
                v.iter().map(|&x| x as f64).collect(),
                v.iter().map(|x| x.to_bits()).collect(),
            )
        }
        DType::BF16 => {
            let v = flat.to_vec1::<half::bf16>().expect("bf16 values");
            (
                v.iter().map(|x| x.to_f64()).collect(),
                v.iter().map(|x| x.to_bits() as u32).collect(),
            )
        }
        DType::F16 => {
            let v = flat.to_vec1::<half::f16>().expect("f16 values");
            (
                v.iter().map(|x| x.to_f64()).collect(),
                v.iter().map(|x| x.to_bits() as u32).collect(),
            )
        }
        other => panic!("unexpected dtype {other:?}"),
    }
}

/// The fixture tensor `key` decoded from little-endian bytes, as (values, bits).
fn fixture_values(st: &safetensors::SafeTensors, key: &str) -> (Vec<usize>, Vec<f64>, Vec<u32>) {
    let view = st.tensor(key).expect("fixture tensor");
    let shape = view.shape().to_vec();
    let data = view.data();
    let (values, bits) = match view.dtype() {
        safetensors::Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| {
                let bits = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                (f32::from_bits(bits) as f64, bits)
            })
            .unzip(),
        safetensors::Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| {
                let bits = u16::from_le_bytes([b[0], b[1]]);
                (half::bf16::from_bits(bits).to_f64(), bits as u32)
            })
            .unzip(),
        safetensors::Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| {
                let bits = u16::from_le_bytes([b[0], b[1]]);
                (half::f16::from_bits(bits).to_f64(), bits as u32)
            })
            .unzip(),
        other => panic!("unexpected fixture dtype {other:?}"),
    };
    (shape, values, bits)
}

#[test]
fn randn_matches_torch_bit_for_bit() {
    let (fixture, bytes) = load_fixture();
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse randn.safetensors");
    println!(
        "fixture from torch {} ({})",
        fixture.torch, fixture.cpu_capability
    );
    let mut failures = Vec::new();
    let mut draws = 0;
    for case in &fixture.cases {
        // One fresh generator per case; its draws continue one stream.
        let mut generator = TorchGenerator::new(case.seed);
        for draw in &case.draws {
            draws += 1;
            let dtype = dtype_of(&draw.dtype);
            let ours = generator
                .randn(&draw.shape, dtype, &Device::Cpu)
                .expect("randn");
            assert_eq!(ours.dims(), draw.shape.as_slice(), "{}", draw.key);
            assert_eq!(ours.dtype(), dtype, "{}", draw.key);
            let (want_shape, want, want_bits) = fixture_values(&st, &draw.key);
            assert_eq!(want_shape, draw.shape, "{}", draw.key);
            let (got, got_bits) = values_and_bits(&ours);
            let mismatches = got_bits
                .iter()
                .zip(&want_bits)
                .filter(|(a, b)| a != b)
                .count();
            if mismatches > 0 {
                let max_diff = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f64::max);
                failures.push(format!(
                    "{} / {}: {mismatches} of {} elements differ, max |diff| {max_diff:e}",
                    case.name,
                    draw.key,
                    want.len()
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {draws} draws differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn latent_sized_draws_match_torch_checksums() {
    let (fixture, _) = load_fixture();
    assert!(!fixture.checksums.is_empty());
    for case in &fixture.checksums {
        let mut generator = TorchGenerator::new(case.seed);
        let t = generator
            .randn(&case.shape, dtype_of(&case.dtype), &Device::Cpu)
            .expect("randn");
        let (_, bits) = values_and_bits(&t);
        // Same formula as gen_torch_randn.py: sum_i bits_i * (2 i + 1) mod 2^64.
        let checksum = bits.iter().enumerate().fold(0u64, |acc, (i, &b)| {
            acc.wrapping_add((b as u64).wrapping_mul(2 * i as u64 + 1))
        });
        assert_eq!(
            checksum, case.checksum,
            "seed {} shape {:?} {}",
            case.seed, case.shape, case.dtype
        );
    }
}

#[test]
fn flat_draws_equal_tensor_draws() {
    let shape = [2, 3, 7];
    let mut a = TorchGenerator::new(5);
    let mut b = TorchGenerator::new(5);
    let flat = a.randn_bf16(42);
    let t = b.randn(&shape, DType::BF16, &Device::Cpu).expect("randn");
    assert_eq!(
        t.flatten_all()
            .expect("flatten")
            .to_vec1::<half::bf16>()
            .expect("values"),
        flat
    );
    // Both generators must be left in the same state.
    assert_eq!(a.randn_f16(9), b.randn_f16(9));
    assert_eq!(a.randn_f32(100), b.randn_f32(100));
    assert_eq!(a.random64(), b.random64());
}

#[test]
fn empty_and_unsupported() {
    let mut generator = TorchGenerator::new(0);
    assert!(generator.randn_f32(0).is_empty());
    let t = generator
        .randn(&[0, 4], DType::F32, &Device::Cpu)
        .expect("empty randn");
    assert_eq!(t.dims(), &[0, 4]);
    for dtype in [DType::F64, DType::U8, DType::U32, DType::I64] {
        assert!(generator.randn(&[4], dtype, &Device::Cpu).is_err());
    }
}
