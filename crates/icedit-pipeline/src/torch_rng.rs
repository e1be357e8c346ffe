//! PyTorch's CPU random numbers, bit for bit.
//!
//! `--seed S` must draw exactly the noise that diffusers draws with
//! `randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(S), dtype=...)`,
//! so this module reproduces the pieces of ATen that `torch.randn` runs on a CPU generator:
//!
//! * `CPUGeneratorImpl`: a 32-bit MT19937 (`at::mt19937`) seeded from the *low 32 bits* of the
//!   64-bit seed (so seeds `7` and `2**32 + 7` give the same stream), with `random()` = one
//!   engine output and `random64()` = `(first << 32) | second`, plus the cached second
//!   Box-Muller value of the scalar double path (`next_double_normal_sample`), which
//!   `manual_seed` clears and which survives between calls.
//! * `normal_kernel` (aten/src/ATen/native/cpu/DistributionTemplates.h), which has two paths:
//!   - `numel >= 16` (a fresh `torch.randn` tensor is contiguous): `normal_fill`. Uniforms
//!     `(random() & (2^24 - 1)) * 2^-24` are turned into normals 16 at a time by Box-Muller
//!     (`u1 = data[j]`, `u2 = data[j + 8]`, `j < 8`); when `numel % 16 != 0` the last 16
//!     outputs are recomputed from 16 *fresh* uniforms. float32 fills the whole buffer with
//!     uniforms first; bf16/f16 (computed in float, then rounded once) draw 16 uniforms per
//!     block, so their streams differ from float32's whenever `numel % 16 != 0`.
//!     On x86 builds with AVX2 (the AVX2 and AVX-512 kernels alike) the 16-wide transform is
//!     `avx_mathfun.h`'s Cephes `log256_ps` / `sincos256_ps`, compiled by GCC with `-mfma`
//!     and its default `-ffp-contract=fast`, so each `a * b + c` of those polynomials is one
//!     fused multiply-add. [`box_muller_16`] replays those exact float operations.
//!   - `numel < 16`: `at::normal_distribution<double>` element by element (two `random64()`
//!     uniforms with 53 bits, `r = sqrt(-2 log1p(-u2))`, `theta = 2 pi u1`, returns
//!     `r cos theta` and caches `r sin theta` for the next element or the next call), cast
//!     to the output type through `f32`.
//!
//! Non-AVX2 builds of torch (ARM, `ATEN_CPU_CAPABILITY=default`) use libm's `logf`/`cosf`/
//! `sinf` instead of the Cephes polynomials and so produce slightly different float noise;
//! this module follows the x86 AVX2/AVX-512 build that diffusers users on x86 get.

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};

/// MT19937 parameters (Matsumoto & Nishimura), as in `at::mt19937`.
const MT_N: usize = 624;
const MT_M: usize = 397;
const MT_MATRIX_A: u32 = 0x9908_b0df;
const MT_UPPER_MASK: u32 = 0x8000_0000;
const MT_LOWER_MASK: u32 = 0x7fff_ffff;

/// Elements per Box-Muller block of torch's vectorised `normal_fill`.
const BLOCK: usize = 16;

/// The 32-bit Mersenne Twister, seeded like `at::mt19937(uint64_t seed)`.
#[derive(Clone)]
struct Mt19937 {
    state: [u32; MT_N],
    next: usize,
}

impl Mt19937 {
    fn new(seed: u64) -> Self {
        let mut state = [0u32; MT_N];
        // torch stores the seed as u64 but initialises the state from its low 32 bits.
        state[0] = seed as u32;
        for j in 1..MT_N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        Self { state, next: MT_N }
    }

    fn next_u32(&mut self) -> u32 {
        if self.next >= MT_N {
            self.twist();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    fn twist(&mut self) {
        for k in 0..MT_N {
            let y = (self.state[k] & MT_UPPER_MASK) | (self.state[(k + 1) % MT_N] & MT_LOWER_MASK);
            let mag = if y & 1 != 0 { MT_MATRIX_A } else { 0 };
            self.state[k] = self.state[(k + MT_M) % MT_N] ^ (y >> 1) ^ mag;
        }
        self.next = 0;
    }
}

/// torch's CPU generator (`torch.Generator("cpu").manual_seed(seed)`).
///
/// Consecutive draws continue one stream exactly as consecutive `torch.randn(...,
/// generator=g)` calls on one generator do: diffusers draws the initial latents first and
/// then the VAE posterior sample from the same generator, and calling [`Self::randn`] twice
/// in that order reproduces both.
#[derive(Clone)]
pub struct TorchGenerator {
    seed: u64,
    engine: Mt19937,
    /// Second value of the last scalar (double) Box-Muller pair, consumed by the next
    /// scalar-path draw, even one in a later call (torch's `next_double_normal_sample`).
    next_double_normal_sample: Option<f64>,
}

impl std::fmt::Debug for TorchGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchGenerator")
            .field("seed", &self.seed)
            .finish_non_exhaustive()
    }
}

impl TorchGenerator {
    /// Same state as `torch.Generator("cpu").manual_seed(seed)`. A negative Python seed
    /// corresponds to its two's-complement `u64` (torch does the same conversion).
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            engine: Mt19937::new(seed),
            next_double_normal_sample: None,
        }
    }

    /// The seed this generator was created with (`Generator.initial_seed()`).
    pub fn initial_seed(&self) -> u64 {
        self.seed
    }

    /// One raw 32-bit draw (`CPUGeneratorImpl::random`).
    pub fn random(&mut self) -> u32 {
        self.engine.next_u32()
    }

    /// One raw 64-bit draw (`CPUGeneratorImpl::random64`): the first 32-bit output is the
    /// high half.
    pub fn random64(&mut self) -> u64 {
        let hi = self.engine.next_u32() as u64;
        let lo = self.engine.next_u32() as u64;
        (hi << 32) | lo
    }

    /// `uniform_real_distribution<float>(0, 1)`: 24 random bits, exact in f32, in [0, 1).
    fn uniform_f32(&mut self) -> f32 {
        (self.random() & ((1 << f32::MANTISSA_DIGITS) - 1)) as f32
            * (1.0 / (1u32 << f32::MANTISSA_DIGITS) as f32)
    }

    /// `uniform_real_distribution<double>(0, 1)`: 53 random bits, exact in f64, in [0, 1).
    fn uniform_f64(&mut self) -> f64 {
        (self.random64() & ((1 << f64::MANTISSA_DIGITS) - 1)) as f64
            * (1.0 / (1u64 << f64::MANTISSA_DIGITS) as f64)
    }

    /// `at::normal_distribution<double>(0, 1)`, the path for tensors with fewer than 16
    /// elements.
    fn normal_f64(&mut self) -> f64 {
        if let Some(cached) = self.next_double_normal_sample.take() {
            // `val * std + mean` with std 1, mean 0 turns -0.0 into +0.0.
            return cached + 0.0;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let radius = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal_sample = Some(radius * theta.sin());
        radius * theta.cos() + 0.0
    }

    /// `torch.randn(numel, generator=g, dtype=torch.float32)`, flattened.
    pub fn randn_f32(&mut self, numel: usize) -> Vec<f32> {
        if numel < BLOCK {
            return (0..numel).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..numel).map(|_| self.uniform_f32()).collect();
        for block in data.chunks_exact_mut(BLOCK) {
            box_muller_16(block);
        }
        if numel % BLOCK != 0 {
            // torch overwrites the last 16 outputs (some already final) from fresh uniforms.
            let tail = &mut data[numel - BLOCK..];
            for value in tail.iter_mut() {
                *value = self.uniform_f32();
            }
            box_muller_16(tail);
        }
        data
    }

    /// `torch.randn(numel, generator=g, dtype=torch.bfloat16)`, flattened.
    pub fn randn_bf16(&mut self, numel: usize) -> Vec<bf16> {
        self.randn_reduced(numel, bf16::from_f32)
    }

    /// `torch.randn(numel, generator=g, dtype=torch.float16)`, flattened.
    pub fn randn_f16(&mut self, numel: usize) -> Vec<f16> {
        self.randn_reduced(numel, f16::from_f32)
    }

    /// The half-precision kernels: float arithmetic, one round-to-nearest-even at the end.
    fn randn_reduced<T: Copy + Default>(&mut self, numel: usize, round: fn(f32) -> T) -> Vec<T> {
        if numel < BLOCK {
            // torch casts the double through float (`BFloat16(float)` / `Half(float)`).
            return (0..numel)
                .map(|_| round(self.normal_f64() as f32))
                .collect();
        }
        let mut out = vec![T::default(); numel];
        let mut block = [0f32; BLOCK];
        // Unlike float32, uniforms are drawn block by block, so the tail's fresh uniforms
        // follow the last full block directly.
        let mut fill = |generator: &mut Self, dst: &mut [T]| {
            for value in block.iter_mut() {
                *value = generator.uniform_f32();
            }
            box_muller_16(&mut block);
            for (d, &v) in dst.iter_mut().zip(block.iter()) {
                *d = round(v);
            }
        };
        for dst in out.chunks_exact_mut(BLOCK) {
            fill(self, dst);
        }
        if numel % BLOCK != 0 {
            fill(self, &mut out[numel - BLOCK..]);
        }
        out
    }

    /// `torch.randn(shape, generator=g, dtype=dtype)` on the CPU generator, then moved to
    /// `device`. Supports F32, BF16 and F16; other dtypes are an error (diffusers never
    /// samples them). Consecutive calls continue the same stream, as consecutive
    /// `torch.randn` calls with one generator do.
    pub fn randn(
        &mut self,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let numel: usize = shape.iter().product();
        match dtype {
            DType::F32 => Tensor::from_vec(self.randn_f32(numel), shape, device),
            DType::BF16 => Tensor::from_vec(self.randn_bf16(numel), shape, device),
            DType::F16 => Tensor::from_vec(self.randn_f16(numel), shape, device),
            other => Err(candle_core::Error::UnsupportedDTypeForOp(
                other,
                "torch-compatible randn",
            )),
        }
    }
}

/// `(2.0f * c10::pi<double>)` narrowed to float, as `_mm256_set1_ps` receives it.
const TWO_PI_F32: f32 = (2.0 * std::f64::consts::PI) as f32;

/// Box-Muller on 8 pairs in place: `u1 = data[j]`, `u2 = data[j + 8]` become
/// `r cos(theta)` and `r sin(theta)` (torch's `NormalFill16<float>` AVX2 kernel, with
/// std 1 and mean 0).
fn box_muller_16(data: &mut [f32]) {
    debug_assert_eq!(data.len(), BLOCK);
    for j in 0..BLOCK / 2 {
        let u1 = 1.0 - data[j]; // [0, 1) -> (0, 1], exact
        let u2 = data[j + BLOCK / 2];
        let radius = (-2.0 * cephes_log(u1)).sqrt();
        let theta = TWO_PI_F32 * u2;
        let (sin, cos) = cephes_sincos(theta);
        // `_mm256_fmadd_ps(n, std, mean)` with std 1, mean 0 is `n + 0.0` (-0.0 -> +0.0).
        data[j] = radius * cos + 0.0;
        data[j + BLOCK / 2] = radius * sin + 0.0;
    }
}

/// `log256_ps` from avx_mathfun.h for one lane, for `x` in (0, 1] (here `x >= 2^-24`, so
/// the denormal clamp and the NaN mask for `x <= 0` never act and are left out).
/// Each `mul_add` is a multiply-add that GCC fused; the other products stay rounded.
/// The constants are avx_mathfun's decimal literals, rounded to f32 as the C compiler does.
#[allow(clippy::excessive_precision)]
fn cephes_log(x: f32) -> f32 {
    // avx_mathfun's 0.707106781186547524 rounds to this same f32.
    const SQRTHF: f32 = std::f32::consts::FRAC_1_SQRT_2;
    const P: [f32; 9] = [
        7.0376836292E-2,
        -1.1514610310E-1,
        1.1676998740E-1,
        -1.2420140846E-1,
        1.4249322787E-1,
        -1.6668057665E-1,
        2.0000714765E-1,
        -2.4999993993E-1,
        3.3333331174E-1,
    ];
    const Q1: f32 = -2.12194440e-4;
    const Q2: f32 = 0.693359375;
    debug_assert!(x > 0.0 && x <= 1.0);

    let bits = x.to_bits();
    // Exponent e and mantissa m in [0.5, 1) with x = m * 2^e.
    let mut e = ((bits >> 23) as i32 - 0x7f) as f32 + 1.0;
    let mut m = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    // if m < sqrt(1/2) { e -= 1; m = m + m - 1 } else { m = m - 1 }, in that op order.
    let small = m < SQRTHF;
    let tmp = if small { m } else { 0.0 };
    m -= 1.0;
    if small {
        e -= 1.0;
    }
    m += tmp;

    let z = m * m;
    let mut y = P[0];
    for &p in &P[1..] {
        y = y.mul_add(m, p);
    }
    y *= m;
    y = y.mul_add(z, e * Q1);
    y -= z * 0.5;
    m += y;
    m + e * Q2
}

/// `sincos256_ps` from avx_mathfun.h for one lane: `(sin x, cos x)` for `x >= 0` (the
/// sign handling for negative inputs is kept since it is cheap and exact).
#[allow(clippy::excessive_precision)]
fn cephes_sincos(x: f32) -> (f32, f32) {
    const FOPI: f32 = 1.27323954473516; // 4 / pi
    const MINUS_DP1: f32 = -0.78515625;
    const MINUS_DP2: f32 = -2.4187564849853515625e-4;
    const MINUS_DP3: f32 = -3.77489497744594108e-8;
    const SINCOF: [f32; 3] = [-1.9515295891E-4, 8.3321608736E-3, -1.6666654611E-1];
    const COSCOF: [f32; 3] = [
        2.443315711809948E-005,
        -1.388731625493765E-003,
        4.166664568298827E-002,
    ];
    const SIGN: u32 = 0x8000_0000;

    let sign_in = x.to_bits() & SIGN;
    let x = x.abs();
    // Octant j, rounded up to even, as cvttps + integer ops.
    let j = (((x * FOPI) as i32) + 1) & !1;
    let y = j as f32;
    let sign_sin = sign_in ^ (((j & 4) as u32) << 29);
    let sign_cos = ((!(j - 2) & 4) as u32) << 29;
    let use_sin_poly = j & 2 == 0;

    // Extended-precision reduction x - j * pi/4.
    let mut x = y.mul_add(MINUS_DP1, x);
    x = y.mul_add(MINUS_DP2, x);
    x = y.mul_add(MINUS_DP3, x);

    let z = x * x;
    let mut c = COSCOF[0].mul_add(z, COSCOF[1]);
    c = c.mul_add(z, COSCOF[2]);
    c *= z;
    c = c.mul_add(z, -(z * 0.5));
    c += 1.0;

    let mut s = SINCOF[0].mul_add(z, SINCOF[1]);
    s = s.mul_add(z, SINCOF[2]);
    s *= z;
    s = s.mul_add(x, x);

    // The blend is done with and/andnot, subtractions and additions; replaying it keeps
    // the sign of zero results identical (x - x and 0 + x give +0.0).
    let (ysin2, ysin1) = if use_sin_poly { (s, 0.0) } else { (0.0, c) };
    let sin = ysin1 + ysin2;
    let cos = (c - ysin1) + (s - ysin2);
    (
        f32::from_bits(sin.to_bits() ^ sign_sin),
        f32::from_bits(cos.to_bits() ^ sign_cos),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_reference_output() {
        // The MT19937 reference: the 10000th output for seed 5489 is 4123659995.
        let mut engine = Mt19937::new(5489);
        let last = (0..10_000).map(|_| engine.next_u32()).last();
        assert_eq!(last, Some(4_123_659_995));
    }

    #[test]
    fn seed_uses_low_32_bits() {
        let mut a = TorchGenerator::new(7);
        let mut b = TorchGenerator::new((1 << 32) + 7);
        assert_eq!(a.randn_f32(40), b.randn_f32(40));
    }

    #[test]
    fn cephes_functions_are_accurate() {
        for i in 1..=1000 {
            let x = i as f32 / 1000.0;
            assert!((cephes_log(x) as f64 - (x as f64).ln()).abs() < 1e-6);
            let t = x * TWO_PI_F32;
            let (s, c) = cephes_sincos(t);
            assert!((s as f64 - (t as f64).sin()).abs() < 1e-6);
            assert!((c as f64 - (t as f64).cos()).abs() < 1e-6);
        }
    }
}
