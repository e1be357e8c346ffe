//! What icedit's tests share. The committed fixtures live in the workspace's `tests/fixtures`
//! (made by the generators in `tests/reference`); every test finds them here, whichever crate
//! it belongs to. Random inputs come from [`randn`], the same in every run. The CLI and HTTP
//! helpers (`cli.rs`, `http.rs`) and the fuzzing helpers (`fuzz.rs`) beside this crate are
//! included with `#[path]` by the tests that use them: the CLI ones name the test's own `icedit`
//! binary, which only its crate's tests know.

use std::cell::Cell;
use std::path::PathBuf;

use candle_core::{Device, Shape, Tensor};

/// The workspace's committed fixtures (`tests/fixtures`).
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// A fixture by its path under `tests/fixtures` (`flux/fill_diptych`, `gguf/source.png`).
pub fn fixture(relative: &str) -> PathBuf {
    fixtures().join(relative)
}

thread_local! {
    /// SplitMix64's state. libtest runs each test on a thread of its own, so every test draws
    /// the same stream in every run, whatever ran before it.
    static STATE: Cell<u64> = const { Cell::new(0x1ced_17ed_5eed) };
}

/// The next number of the calling thread's stream (SplitMix64).
fn next_u64() -> u64 {
    STATE.with(|state| {
        let next = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        state.set(next);
        let mut z = next;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// Uniform in (0, 1]: never 0, so that its logarithm is finite.
fn uniform() -> f64 {
    ((next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
}

/// `Tensor::randn` on the CPU in f32, drawn from a fixed stream per test (Box-Muller over
/// SplitMix64): a test that fails here fails the same way on every machine and every run.
pub fn randn(mean: f32, std: f32, shape: impl Into<Shape>) -> Tensor {
    let shape = shape.into();
    let values: Vec<f32> = (0..shape.elem_count())
        .map(|_| {
            let (u, v) = (uniform(), uniform());
            let normal = (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos();
            mean + std * normal as f32
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).expect("as many values as the shape holds")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn randn_is_the_same_on_every_run_and_normal() {
        let first = randn(0.0, 1.0, 4000).to_vec1::<f32>().unwrap();
        let again = std::thread::spawn(|| randn(0.0, 1.0, 4000).to_vec1::<f32>().unwrap());
        assert_eq!(
            first,
            again.join().unwrap(),
            "a new thread starts the same stream"
        );
        let n = first.len() as f32;
        let mean = first.iter().sum::<f32>() / n;
        let var = first.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / n;
        assert!(mean.abs() < 0.05 && (var - 1.0).abs() < 0.1, "{mean} {var}");
        let scaled = randn(3.0, 0.5, (2, 3));
        assert_eq!(scaled.dims(), [2, 3]);
        assert_ne!(randn(0.0, 1.0, 4).to_vec1::<f32>().unwrap(), first[..4]);
    }
}
