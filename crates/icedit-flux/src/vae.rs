//! The FLUX.1 VAE: diffusers' `AutoencoderKL` with 16 latent channels, computing what diffusers
//! computes. Module and tensor names are diffusers'; a BFL/LDM `ae.safetensors` is read through
//! [`ldm_name`].
//!
//! ```no_run
//! # fn main() -> icedit_flux::Result<()> {
//! use candle_core::{DType, Device, Tensor};
//! use icedit_flux::AutoencoderKl;
//! let vae = AutoencoderKl::load("FLUX.1-Fill-dev".as_ref(), DType::F32, &Device::Cpu)?;
//! let image = Tensor::zeros((1, 3, 64, 64), DType::F32, &Device::Cpu)?; // pixels in [-1, 1]
//! let latents = vae.scale_latents(vae.encode(&image)?.mode())?; // the transformer's space
//! let decoded = vae.decode(&vae.unscale_latents(&latents)?)?;
//! # Ok(()) }
//! ```
//!
//! The VAE runs in the dtype it is loaded in, as the Fill pipeline runs it (it does not honour
//! `force_upcast`); group norms, softmax and attention compute in f32, and so do convolutions on
//! the CPU, each rounding once to the model dtype as PyTorch does. Memory stays bounded at
//! large sizes: attention takes queries in chunks, CPU convolutions take output rows in bands.

use crate::cpu_kernels::cpu_fast_paths;
use std::path::Path;

use candle_core::{CpuStorage, DType, Device, Module, Storage, Tensor, WithDType};
use candle_nn::VarBuilder;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{FluxError, Result};
use crate::linear::Linear;
use crate::weights::{check_model_dtype, diffusers_weight_files, MappedTensors, TensorFiles};

type CResult<T> = candle_core::Result<T>;

/// Every group norm of the VAE (resnets, attention, output) uses this epsilon.
const NORM_EPS: f64 = 1e-6;
/// diffusers clamps the posterior's log-variance to this range.
const LOGVAR_RANGE: (f64, f64) = (-30.0, 20.0);
/// Upper bound on the f32 attention scores held at once.
const SCORE_BYTES_BUDGET: usize = 256 << 20;

const DOWN_BLOCK: &str = "DownEncoderBlock2D";
const UP_BLOCK: &str = "UpDecoderBlock2D";

/// VAE hyper-parameters, with the field names and defaults of diffusers' `AutoencoderKL` config
/// (`vae/config.json`). Fields that do not change the computation (`sample_size`,
/// `force_upcast`, `latents_mean`, ...) are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "defaults::three")]
    pub in_channels: usize,
    #[serde(default = "defaults::three")]
    pub out_channels: usize,
    #[serde(default = "defaults::down_block_types")]
    pub down_block_types: Vec<String>,
    #[serde(default = "defaults::up_block_types")]
    pub up_block_types: Vec<String>,
    #[serde(default = "defaults::block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "defaults::one")]
    pub layers_per_block: usize,
    #[serde(default = "defaults::act_fn")]
    pub act_fn: String,
    #[serde(default = "defaults::latent_channels")]
    pub latent_channels: usize,
    #[serde(default = "defaults::norm_num_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "defaults::scaling_factor")]
    pub scaling_factor: f64,
    /// `None` (diffusers' default) means no shift; FLUX's VAE has one.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "defaults::yes")]
    pub use_quant_conv: bool,
    #[serde(default = "defaults::yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "defaults::yes")]
    pub mid_block_add_attention: bool,
}

mod defaults {
    pub fn one() -> usize {
        1
    }
    pub fn three() -> usize {
        3
    }
    pub fn down_block_types() -> Vec<String> {
        vec![super::DOWN_BLOCK.into()]
    }
    pub fn up_block_types() -> Vec<String> {
        vec![super::UP_BLOCK.into()]
    }
    pub fn block_out_channels() -> Vec<usize> {
        vec![64]
    }
    pub fn act_fn() -> String {
        "silu".into()
    }
    pub fn latent_channels() -> usize {
        4
    }
    pub fn norm_num_groups() -> usize {
        32
    }
    pub fn scaling_factor() -> f64 {
        0.18215
    }
    pub fn yes() -> bool {
        true
    }
}

impl VaeConfig {
    /// The FLUX.1 VAE (`black-forest-labs/FLUX.1-*/vae/config.json`).
    pub fn flux() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec![DOWN_BLOCK.into(); 4],
            up_block_types: vec![UP_BLOCK.into(); 4],
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            act_fn: "silu".into(),
            latent_channels: 16,
            norm_num_groups: 32,
            scaling_factor: 0.3611,
            shift_factor: Some(0.1159),
            use_quant_conv: false,
            use_post_quant_conv: false,
            mid_block_add_attention: true,
        }
    }

    pub fn from_json_file(path: &Path) -> Result<Self> {
        let bad = |message: String| FluxError::VaeConfig {
            path: Some(path.to_path_buf()),
            message,
        };
        let text = crate::files::read_text_file(path, crate::files::MAX_CONFIG_BYTES).map_err(
            |source| FluxError::Io {
                path: path.to_path_buf(),
                source,
            },
        )?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if let Some(class) = value.get("_class_name").and_then(|c| c.as_str()) {
            if class != "AutoencoderKL" {
                return Err(bad(format!(
                    "_class_name is {class}, not AutoencoderKL (is this the VAE's config.json?)"
                )));
            }
        }
        let config: Self = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
        config.validate().map_err(|e| match e {
            FluxError::VaeConfig { message, .. } => bad(message),
            other => other,
        })?;
        Ok(config)
    }

    /// The height and width ratio between images and latents: 8 for FLUX.
    pub fn downscale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// Checks that the config describes a VAE this module computes, so that an unsupported one
    /// fails here with a reason rather than computing something else.
    pub fn validate(&self) -> Result<()> {
        let fail = |message: String| {
            Err(FluxError::VaeConfig {
                path: None,
                message,
            })
        };
        let n = self.block_out_channels.len();
        use crate::files::{check_config_sizes, MAX_CONFIG_WIDTH};
        let mut sizes = vec![
            ("the number of block_out_channels", n, 8),
            ("layers_per_block", self.layers_per_block, 16),
            ("latent_channels", self.latent_channels, 1024),
        ];
        sizes.extend(
            self.block_out_channels
                .iter()
                .map(|c| ("block_out_channels", *c, MAX_CONFIG_WIDTH / 4)),
        );
        check_config_sizes(&sizes).or_else(fail)?;
        if n == 0 || self.block_out_channels.contains(&0) {
            return fail(format!(
                "block_out_channels {:?} must be non-empty and positive",
                self.block_out_channels
            ));
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return fail(format!(
                "{} down and {} up block types for {n} block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        if let Some(t) = self.down_block_types.iter().find(|t| *t != DOWN_BLOCK) {
            return fail(format!(
                "down block type {t} is not supported (only {DOWN_BLOCK})"
            ));
        }
        if let Some(t) = self.up_block_types.iter().find(|t| *t != UP_BLOCK) {
            return fail(format!(
                "up block type {t} is not supported (only {UP_BLOCK})"
            ));
        }
        if self.act_fn != "silu" {
            return fail(format!(
                "act_fn {} is not supported (only silu)",
                self.act_fn
            ));
        }
        if self.norm_num_groups == 0
            || self
                .block_out_channels
                .iter()
                .any(|c| c % self.norm_num_groups != 0)
        {
            return fail(format!(
                "norm_num_groups {} must divide every block_out_channels {:?}",
                self.norm_num_groups, self.block_out_channels
            ));
        }
        if self.in_channels == 0 || self.out_channels == 0 || self.latent_channels == 0 {
            return fail("in_channels, out_channels and latent_channels must be positive".into());
        }
        if self.layers_per_block == 0 {
            return fail("layers_per_block must be positive".into());
        }
        if !self.scaling_factor.is_finite() || self.scaling_factor == 0.0 {
            return fail(format!(
                "scaling_factor {} must be finite and non-zero",
                self.scaling_factor
            ));
        }
        if self.shift_factor.is_some_and(|s| !s.is_finite()) {
            return fail("shift_factor must be finite".into());
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Layers

/// `torch.nn.GroupNorm` (affine), optionally followed by SiLU. Statistics and the affine map are
/// computed in f32 and rounded once to the input dtype, as PyTorch does for half precision; the
/// SiLU then runs on the rounded values, as it does after a separate op.
#[derive(Debug, Clone)]
struct GroupNorm {
    /// Held in f32 (after rounding to the model dtype, as PyTorch would see them).
    weight: Tensor,
    bias: Tensor,
    groups: usize,
}

impl GroupNorm {
    fn new(groups: usize, channels: usize, vb: VarBuilder) -> CResult<Self> {
        Ok(Self {
            weight: vb.get(channels, "weight")?.to_dtype(DType::F32)?,
            bias: vb.get(channels, "bias")?.to_dtype(DType::F32)?,
            groups,
        })
    }

    fn forward(&self, x: &Tensor, silu: bool) -> CResult<Tensor> {
        if cpu_fast_paths(x.device()) {
            self.forward_cpu(x, silu)
        } else {
            self.forward_ops(x, silu)
        }
    }

    /// With candle's ops, for any device.
    fn forward_ops(&self, x: &Tensor, silu: bool) -> CResult<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let dtype = x.dtype();
        let xg = x
            .to_dtype(DType::F32)?
            .reshape((b, self.groups, (c / self.groups) * h * w))?;
        let mean = xg.mean_keepdim(2)?;
        let centred = xg.broadcast_sub(&mean)?;
        let inv_std = (centred.sqr()?.mean_keepdim(2)? + NORM_EPS)?
            .sqrt()?
            .recip()?;
        let per_channel = |t: &Tensor| t.reshape((1, c, 1, 1));
        let y = centred
            .broadcast_mul(&inv_std)?
            .reshape((b, c, h, w))?
            .broadcast_mul(&per_channel(&self.weight)?)?
            .broadcast_add(&per_channel(&self.bias)?)?
            .to_dtype(dtype)?;
        if silu {
            y.silu()
        } else {
            Ok(y)
        }
    }

    /// Two passes over the input (statistics, then the normalised output) instead of the
    /// half-dozen full-size temporaries of the op-by-op version.
    fn forward_cpu(&self, x: &Tensor, silu: bool) -> CResult<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let x = x.contiguous()?;
        let weight = self.weight.to_vec1::<f32>()?;
        let bias = self.bias.to_vec1::<f32>()?;
        let (storage, layout) = x.storage_and_layout();
        let start = layout.start_offset();
        let len = b * c * h * w;
        let shape = GroupShape {
            groups: self.groups,
            channels_per_group: c / self.groups,
            plane: h * w,
        };
        let out = match &*storage {
            Storage::Cpu(CpuStorage::F32(v)) => {
                shape.apply(&v[start..start + len], &weight, &bias, silu, x.device())
            }
            Storage::Cpu(CpuStorage::BF16(v)) => {
                shape.apply(&v[start..start + len], &weight, &bias, silu, x.device())
            }
            Storage::Cpu(CpuStorage::F16(v)) => {
                shape.apply(&v[start..start + len], &weight, &bias, silu, x.device())
            }
            _ => candle_core::bail!("group norm: unsupported dtype {:?}", x.dtype()),
        };
        drop(storage);
        out?.reshape((b, c, h, w))
    }
}

#[derive(Clone, Copy)]
struct GroupShape {
    groups: usize,
    channels_per_group: usize,
    plane: usize,
}

impl GroupShape {
    fn apply<T: WithDType>(
        self,
        x: &[T],
        weight: &[f32],
        bias: &[f32],
        silu: bool,
        device: &Device,
    ) -> CResult<Tensor> {
        let group_len = self.channels_per_group * self.plane;
        let mut out = vec![T::from_f64(0.0); x.len()];
        out.par_chunks_mut(group_len)
            .zip(x.par_chunks(group_len))
            .enumerate()
            .for_each(|(bg, (out, x))| {
                let n = group_len as f64;
                let mean = sum_f32(x, |v| v) / n;
                let mean32 = mean as f32;
                let var = sum_f32(x, |v| (v - mean32) * (v - mean32)) / n;
                let inv_std = (1.0 / (var + NORM_EPS).sqrt()) as f32;
                let first_channel = (bg % self.groups) * self.channels_per_group;
                for (c, (out, x)) in out
                    .chunks_exact_mut(self.plane)
                    .zip(x.chunks_exact(self.plane))
                    .enumerate()
                {
                    let scale = inv_std * weight[first_channel + c];
                    let shift = bias[first_channel + c] - mean32 * scale;
                    for (o, &v) in out.iter_mut().zip(x) {
                        let y = T::from_f64((to_f32(v) * scale + shift) as f64);
                        *o = if silu {
                            let y = to_f32(y);
                            T::from_f64((y / (1.0 + (-y).exp())) as f64)
                        } else {
                            y
                        };
                    }
                }
            });
        Tensor::from_vec(out, x.len(), device)
    }
}

fn to_f32<T: WithDType>(v: T) -> f32 {
    v.to_f64() as f32
}

/// Sum of `f(x)` over `x` in f32 lanes and f64 blocks (vectorisable, and accurate over
/// millions of elements).
fn sum_f32<T: WithDType>(x: &[T], f: impl Fn(f32) -> f32) -> f64 {
    let mut total = 0f64;
    for block in x.chunks(4096) {
        let mut lanes = [0f32; 8];
        let mut chunks = block.chunks_exact(8);
        for chunk in &mut chunks {
            for (lane, &v) in lanes.iter_mut().zip(chunk) {
                *lane += f(to_f32(v));
            }
        }
        let tail: f32 = chunks.remainder().iter().map(|&v| f(to_f32(v))).sum();
        total += lanes.iter().map(|&l| l as f64).sum::<f64>() + tail as f64;
    }
    total
}

/// `torch.nn.Conv2d` with bias, and zero padding given per side (top, bottom, left, right) so
/// that `Downsample2D`'s asymmetric padding needs no padded copy. On the CPU it runs
/// [`conv2d_cpu`] in f32 (half precision rounds once, after the bias, as PyTorch's does; candle
/// has no bf16 matmul there), elsewhere candle's convolution.
#[derive(Debug, Clone)]
struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: [usize; 4],
}

impl Conv2d {
    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let dtype = x.dtype();
        if cpu_fast_paths(x.device()) {
            let f32 = |t: &Tensor| t.to_dtype(DType::F32);
            return conv2d_cpu(
                &f32(x)?,
                &f32(&self.weight)?,
                &f32(&self.bias)?,
                self.stride,
                self.padding,
            )?
            .to_dtype(dtype);
        }
        if x.device().is_cpu() && dtype != DType::F32 {
            // The generic path on the CPU (ICEDIT_CPU_FAST_PATHS=0): candle's CPU backend has
            // no half-precision matmul, so this widens and rounds once, after the bias.
            let f32 = |t: &Tensor| t.to_dtype(DType::F32);
            return conv2d_banded(&f32(x)?, &f32(&self.weight)?, self.stride, self.padding)?
                .broadcast_add(&f32(&self.bias)?.reshape((1, (), 1, 1))?)?
                .to_dtype(dtype);
        }
        conv2d_banded(x, &self.weight, self.stride, self.padding)?
            .broadcast_add(&self.bias.reshape((1, (), 1, 1))?)
    }
}

/// Bytes of unfolded input (im2col) one call of candle's convolution may hold: it unfolds the
/// whole input at once (a 1024x2048 decode's last layers: 9 GB in f32).
const GENERIC_IM2COL_BYTES: usize = 512 << 20;

/// candle's convolution (no bias) with zero padding `[top, bottom, left, right]`, over bands of
/// output rows whose unfolded input stays under [`GENERIC_IM2COL_BYTES`]: each band reads its
/// rows of the input (with the halo the kernel needs) and padding only where the image ends, so
/// every output value is the same sum as in one call.
fn conv2d_banded(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: [usize; 4],
) -> CResult<Tensor> {
    conv2d_in_bands(x, weight, stride, padding, GENERIC_IM2COL_BYTES)
}

/// [`conv2d_banded`] with bands under `band_bytes`.
fn conv2d_in_bands(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    [top, bottom, left, right]: [usize; 4],
    band_bytes: usize,
) -> CResult<Tensor> {
    let (_, c_in, h, w) = x.dims4()?;
    let k = weight.dim(2)?;
    let out_h = (h + top + bottom - k) / stride + 1;
    let out_w = (w + left + right - k) / stride + 1;
    let row_bytes = out_w * c_in * k * k * x.dtype().size_in_bytes() * x.dim(0)?;
    let rows = (band_bytes / row_bytes.max(1)).clamp(1, out_h);
    let symmetric = top == bottom && top == left && top == right;
    if rows == out_h && symmetric {
        return x.conv2d(weight, top, stride, 1, 1);
    }
    let mut bands = Vec::with_capacity(out_h.div_ceil(rows));
    for first in (0..out_h).step_by(rows) {
        let last = (first + rows).min(out_h);
        // Rows of the padded input this band reads, then the same in the input's own rows.
        let (from, to) = (first * stride, (last - 1) * stride + k);
        let (start, end) = (
            from.saturating_sub(top).min(h),
            to.saturating_sub(top).min(h),
        );
        let band = x
            .narrow(2, start, end - start)?
            .pad_with_zeros(
                2,
                top.min(to).saturating_sub(from),
                to.saturating_sub((top + h).max(from)),
            )?
            .pad_with_zeros(3, left, right)?;
        bands.push(band.conv2d(weight, 0, stride, 1, 1)?);
    }
    Tensor::cat(&bands, 2)
}

fn conv(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: [usize; 4],
    vb: VarBuilder,
) -> CResult<Conv2d> {
    Ok(Conv2d {
        weight: vb.get((out_channels, in_channels, kernel, kernel), "weight")?,
        bias: vb.get(out_channels, "bias")?,
        stride,
        padding,
    })
}

/// Bytes of im2col matrix held at once by [`conv2d_cpu`].
const IM2COL_BAND_BYTES: usize = 64 << 20;

/// Convolution with bias of f32 `x` `[B, Ci, H, W]` by `weight` `[Co, Ci, k, k]` on the CPU,
/// with zero padding `[top, bottom, left, right]`. Output rows are taken in bands whose im2col
/// matrix stays under [`IM2COL_BAND_BYTES`]: each band's matrix is filled with whole-row copies
/// (in parallel over its rows) and multiplied by the weights in one multithreaded GEMM that
/// writes straight into the output. candle's CPU convolution gathers element by element into
/// 512-pixel tiles; this makes the FLUX VAE 1.3-1.5x faster end to end (both then spend most of
/// their time in the same `gemm` kernels).
fn conv2d_cpu(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    [top, bottom, left, right]: [usize; 4],
) -> CResult<Tensor> {
    let (b, ci, h, w) = x.dims4()?;
    let (co, weight_ci, kh, kw) = weight.dims4()?;
    if weight_ci != ci || h + top + bottom < kh || w + left + right < kw || stride == 0 {
        candle_core::bail!(
            "conv2d: input {:?}, weight {:?}, stride {stride} do not fit",
            x.dims(),
            weight.dims()
        );
    }
    let (ho, wo) = (
        (h + top + bottom - kh) / stride + 1,
        (w + left + right - kw) / stride + 1,
    );
    let taps = kh * kw;
    let depth = ci * taps;
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    let bias = bias.to_vec1::<f32>()?;
    let (x_storage, x_layout) = x.storage_and_layout();
    let (w_storage, w_layout) = weight.storage_and_layout();
    let f32_data = |s: &Storage, l: &candle_core::Layout| -> CResult<*const f32> {
        match (s, l.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(v)), Some((start, _))) => Ok(v[start..].as_ptr()),
            _ => candle_core::bail!("conv2d_cpu: expected contiguous f32 CPU tensors"),
        }
    };
    // SAFETY: both tensors are contiguous f32 and their storage guards live until the end.
    let xs = unsafe { std::slice::from_raw_parts(f32_data(&x_storage, x_layout)?, b * ci * h * w) };
    let weights = f32_data(&w_storage, w_layout)?;

    let plane_out = ho * wo;
    let band_rows = (IM2COL_BAND_BYTES / (4 * depth * wo)).clamp(1, ho);
    let mut col = vec![0f32; depth * band_rows * wo];
    let mut out = vec![0f32; b * co * plane_out];
    for (x_b, out_b) in xs
        .chunks_exact(ci * h * w)
        .zip(out.chunks_exact_mut(co * plane_out))
    {
        out_b
            .par_chunks_mut(plane_out)
            .zip(bias.par_iter())
            .for_each(|(plane, &bias)| plane.fill(bias));
        for r0 in (0..ho).step_by(band_rows) {
            let rows = band_rows.min(ho - r0);
            let n = rows * wo;
            let col = &mut col[..depth * n];
            // Row (c, ky, kx) of the matrix: input channel c under tap (ky, kx) at every output
            // position of the band.
            col.par_chunks_mut(n).enumerate().for_each(|(row, dst)| {
                let (c, tap) = (row / taps, row % taps);
                let (ky, kx) = (tap / kw, tap % kw);
                let src = &x_b[c * h * w..(c + 1) * h * w];
                for (i, dst) in dst.chunks_exact_mut(wo).enumerate() {
                    let y = (r0 + i) * stride + ky;
                    if y < top || y - top >= h {
                        dst.fill(0.0);
                        continue;
                    }
                    let src_row = &src[(y - top) * w..(y - top + 1) * w];
                    if stride == 1 {
                        // Output column j reads input column j + kx - left.
                        let j0 = left.saturating_sub(kx).min(wo);
                        let j1 = (w + left).saturating_sub(kx).clamp(j0, wo);
                        dst[..j0].fill(0.0);
                        dst[j1..].fill(0.0);
                        dst[j0..j1].copy_from_slice(&src_row[j0 + kx - left..j1 + kx - left]);
                    } else {
                        for (j, v) in dst.iter_mut().enumerate() {
                            let xx = j * stride + kx;
                            *v = if xx >= left && xx - left < w {
                                src_row[xx - left]
                            } else {
                                0.0
                            };
                        }
                    }
                }
            });
            // SAFETY: out_b[co, r0*wo .. r0*wo + n] (row stride ho*wo) lies within out_b; the
            // weights are [co, depth] and col [depth, n], both contiguous and alive.
            unsafe {
                gemm::gemm(
                    co,
                    n,
                    depth,
                    out_b.as_mut_ptr().add(r0 * wo),
                    1,
                    plane_out as isize,
                    true,
                    weights,
                    1,
                    depth as isize,
                    col.as_ptr(),
                    1,
                    n as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(0),
                );
            }
        }
    }
    drop((x_storage, w_storage));
    Tensor::from_vec(out, (b, co, ho, wo), x.device())
}

/// diffusers' `ResnetBlock2D` without time embedding: two (GroupNorm, SiLU, 3x3 conv) and a
/// 1x1 conv shortcut when the channel count changes.
#[derive(Debug, Clone)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(
        groups: usize,
        in_channels: usize,
        out_channels: usize,
        vb: VarBuilder,
    ) -> CResult<Self> {
        Ok(Self {
            norm1: GroupNorm::new(groups, in_channels, vb.pp("norm1"))?,
            conv1: conv(in_channels, out_channels, 3, 1, [1; 4], vb.pp("conv1"))?,
            norm2: GroupNorm::new(groups, out_channels, vb.pp("norm2"))?,
            conv2: conv(out_channels, out_channels, 3, 1, [1; 4], vb.pp("conv2"))?,
            conv_shortcut: (in_channels != out_channels)
                .then(|| {
                    conv(
                        in_channels,
                        out_channels,
                        1,
                        1,
                        [0; 4],
                        vb.pp("conv_shortcut"),
                    )
                })
                .transpose()?,
        })
    }

    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x, true)?)?;
        let h = self.conv2.forward(&self.norm2.forward(&h, true)?)?;
        match &self.conv_shortcut {
            Some(shortcut) => shortcut.forward(x)? + h,
            None => x + h,
        }
    }
}

/// diffusers' `Attention` as built for the VAE mid block: one head over all `h*w` positions,
/// GroupNorm in front, residual connection, no output rescaling.
#[derive(Debug, Clone)]
struct SpatialAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl SpatialAttention {
    fn new(groups: usize, channels: usize, vb: VarBuilder) -> CResult<Self> {
        let linear = |name: &str| Linear::load(channels, channels, vb.pp(name));
        Ok(Self {
            group_norm: GroupNorm::new(groups, channels, vb.pp("group_norm"))?,
            to_q: linear("to_q")?,
            to_k: linear("to_k")?,
            to_v: linear("to_v")?,
            to_out: linear("to_out.0")?,
        })
    }

    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self
            .group_norm
            .forward(x, false)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let out = attention(
            &self.to_q.forward(&tokens)?,
            &self.to_k.forward(&tokens)?,
            &self.to_v.forward(&tokens)?,
            SCORE_BYTES_BUDGET,
        )?;
        let out = self
            .to_out
            .forward(&out)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        out + x
    }
}

/// Softmax attention of `q` over `k`, `v` (`[B, S, C]`, one head, scale `1/sqrt(C)`): the
/// transformer's query-chunked attention, so a 1024x1024 image's 16k x 16k score matrix (1 GiB
/// in f32) is never held whole. (The transformer's tiled CPU kernel is slower here: with
/// 512-wide heads it repacks 32 MB of keys for every 16-query tile, where a chunk of thousands
/// of queries makes one large matrix product.)
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, score_bytes: usize) -> CResult<Tensor> {
    let one_head = |x: &Tensor| x.unsqueeze(1);
    crate::attention::chunked_attention_within(
        &one_head(q)?,
        &one_head(k)?,
        &one_head(v)?,
        score_bytes,
    )?
    .squeeze(1)
}

/// diffusers' `UNetMidBlock2D` (one layer): resnet, attention (optional), resnet.
#[derive(Debug, Clone)]
struct MidBlock {
    resnet_0: ResnetBlock,
    attention: Option<SpatialAttention>,
    resnet_1: ResnetBlock,
}

impl MidBlock {
    fn new(cfg: &VaeConfig, channels: usize, vb: VarBuilder) -> CResult<Self> {
        let groups = cfg.norm_num_groups;
        Ok(Self {
            resnet_0: ResnetBlock::new(groups, channels, channels, vb.pp("resnets.0"))?,
            attention: cfg
                .mid_block_add_attention
                .then(|| SpatialAttention::new(groups, channels, vb.pp("attentions.0")))
                .transpose()?,
            resnet_1: ResnetBlock::new(groups, channels, channels, vb.pp("resnets.1"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let mut x = self.resnet_0.forward(x)?;
        if let Some(attention) = &self.attention {
            x = attention.forward(&x)?;
        }
        self.resnet_1.forward(&x)
    }
}

/// diffusers' `DownEncoderBlock2D`: resnets, then (except at the last level) `Downsample2D`,
/// which pads right and bottom by one and applies a 3x3 stride-2 conv without padding.
#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    downsample: Option<Conv2d>,
}

impl DownBlock {
    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let mut x = x.clone();
        for resnet in &self.resnets {
            x = resnet.forward(&x)?;
        }
        match &self.downsample {
            Some(conv) => conv.forward(&x),
            None => Ok(x),
        }
    }
}

/// diffusers' `UpDecoderBlock2D`: resnets, then (except at the last level) `Upsample2D`: nearest
/// 2x upsampling and a 3x3 conv.
#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    upsample: Option<Conv2d>,
}

impl UpBlock {
    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let mut x = x.clone();
        for resnet in &self.resnets {
            x = resnet.forward(&x)?;
        }
        match &self.upsample {
            Some(conv) => {
                let (_, _, h, w) = x.dims4()?;
                conv.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)
            }
            None => Ok(x),
        }
    }
}

/// Image `[B, in, H, W]` to posterior parameters `[B, 2 * latent, H/8, W/8]` (mean, then logvar).
#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(cfg: &VaeConfig, vb: VarBuilder) -> CResult<Self> {
        let channels = &cfg.block_out_channels;
        let groups = cfg.norm_num_groups;
        let last = *channels.last().expect("validated");
        let mut down_blocks = Vec::with_capacity(channels.len());
        let mut in_channels = channels[0];
        for (i, &out_channels) in channels.iter().enumerate() {
            let vb = vb.pp(format!("down_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let c_in = if j == 0 { in_channels } else { out_channels };
                    ResnetBlock::new(groups, c_in, out_channels, vb.pp(format!("resnets.{j}")))
                })
                .collect::<CResult<_>>()?;
            let downsample = (i + 1 < channels.len())
                .then(|| {
                    // Downsample2D pads right and bottom only.
                    conv(
                        out_channels,
                        out_channels,
                        3,
                        2,
                        [0, 1, 0, 1],
                        vb.pp("downsamplers.0.conv"),
                    )
                })
                .transpose()?;
            down_blocks.push(DownBlock {
                resnets,
                downsample,
            });
            in_channels = out_channels;
        }
        Ok(Self {
            conv_in: conv(cfg.in_channels, channels[0], 3, 1, [1; 4], vb.pp("conv_in"))?,
            down_blocks,
            mid_block: MidBlock::new(cfg, last, vb.pp("mid_block"))?,
            conv_norm_out: GroupNorm::new(groups, last, vb.pp("conv_norm_out"))?,
            conv_out: conv(
                last,
                2 * cfg.latent_channels,
                3,
                1,
                [1; 4],
                vb.pp("conv_out"),
            )?,
        })
    }

    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let mut x = self.conv_in.forward(x)?;
        for block in &self.down_blocks {
            x = block.forward(&x)?;
        }
        let x = self.mid_block.forward(&x)?;
        self.conv_out
            .forward(&self.conv_norm_out.forward(&x, true)?)
    }
}

/// Latents `[B, latent, h, w]` to image `[B, out, 8h, 8w]`.
#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(cfg: &VaeConfig, vb: VarBuilder) -> CResult<Self> {
        let reversed: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let groups = cfg.norm_num_groups;
        let mut up_blocks = Vec::with_capacity(reversed.len());
        let mut in_channels = reversed[0];
        for (i, &out_channels) in reversed.iter().enumerate() {
            let vb = vb.pp(format!("up_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let c_in = if j == 0 { in_channels } else { out_channels };
                    ResnetBlock::new(groups, c_in, out_channels, vb.pp(format!("resnets.{j}")))
                })
                .collect::<CResult<_>>()?;
            let upsample = (i + 1 < reversed.len())
                .then(|| {
                    conv(
                        out_channels,
                        out_channels,
                        3,
                        1,
                        [1; 4],
                        vb.pp("upsamplers.0.conv"),
                    )
                })
                .transpose()?;
            up_blocks.push(UpBlock { resnets, upsample });
            in_channels = out_channels;
        }
        let first = cfg.block_out_channels[0];
        Ok(Self {
            conv_in: conv(
                cfg.latent_channels,
                reversed[0],
                3,
                1,
                [1; 4],
                vb.pp("conv_in"),
            )?,
            mid_block: MidBlock::new(cfg, reversed[0], vb.pp("mid_block"))?,
            up_blocks,
            conv_norm_out: GroupNorm::new(groups, first, vb.pp("conv_norm_out"))?,
            conv_out: conv(first, cfg.out_channels, 3, 1, [1; 4], vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, z: &Tensor) -> CResult<Tensor> {
        let mut x = self.mid_block.forward(&self.conv_in.forward(z)?)?;
        for block in &self.up_blocks {
            x = block.forward(&x)?;
        }
        self.conv_out
            .forward(&self.conv_norm_out.forward(&x, true)?)
    }
}

// ---------------------------------------------------------------------------------------------
// The model

/// The encoder's diagonal Gaussian over latents (diffusers' `DiagonalGaussianDistribution`).
#[derive(Debug, Clone)]
pub struct Posterior {
    /// `[B, latent, h, w]`.
    pub mean: Tensor,
    /// Log-variance, clamped to [-30, 20]; same shape.
    pub logvar: Tensor,
}

impl Posterior {
    /// `exp(0.5 * logvar)`.
    pub fn std(&self) -> Result<Tensor> {
        Ok((&self.logvar * 0.5)?.exp()?)
    }

    /// `mean + std * noise`, with `noise` standard normal of the posterior's shape, drawn by
    /// the caller (diffusers draws it with the pipeline's generator in the VAE's dtype); it is
    /// cast to the posterior's dtype and device.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        if noise.dims() != self.mean.dims() {
            return Err(FluxError::Input(format!(
                "posterior noise has shape {:?}, the posterior {:?}",
                noise.dims(),
                self.mean.dims()
            )));
        }
        let noise = noise
            .to_device(self.mean.device())?
            .to_dtype(self.mean.dtype())?;
        Ok((&self.mean + (self.std()? * noise)?)?)
    }

    /// The mean (the distribution's mode).
    pub fn mode(&self) -> &Tensor {
        &self.mean
    }
}

/// diffusers' `AutoencoderKL` (the FLUX VAE and any config of the same structure).
#[derive(Debug, Clone)]
pub struct AutoencoderKl {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: VaeConfig,
    dtype: DType,
    device: Device,
}

impl AutoencoderKl {
    /// Builds the VAE from diffusers-named tensors in `vb`, in `vb`'s dtype and device.
    pub fn new(config: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        check_model_dtype(vb.dtype())?;
        let latent2 = 2 * config.latent_channels;
        let latent = config.latent_channels;
        Ok(Self {
            encoder: Encoder::new(config, vb.pp("encoder"))?,
            decoder: Decoder::new(config, vb.pp("decoder"))?,
            quant_conv: config
                .use_quant_conv
                .then(|| conv(latent2, latent2, 1, 1, [0; 4], vb.pp("quant_conv")))
                .transpose()?,
            post_quant_conv: config
                .use_post_quant_conv
                .then(|| conv(latent, latent, 1, 1, [0; 4], vb.pp("post_quant_conv")))
                .transpose()?,
            config: config.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// Loads the VAE onto `device` as `dtype` (f32, bf16 or f16) from any of:
    /// - a diffusers pipeline folder (uses its `vae/` subfolder; without one, its
    ///   `ae.safetensors`),
    /// - a diffusers VAE folder (`config.json` + `diffusion_pytorch_model*.safetensors`),
    /// - a single `.safetensors` file in BFL/LDM naming (as FLUX's `ae.safetensors`; the
    ///   `first_stage_model.` or `vae.` prefixes of bundled checkpoints are understood) or in
    ///   diffusers naming. Its config is read off the tensor shapes, with FLUX's scaling and
    ///   shift factors and 32 norm groups; anything else needs
    ///   [`AutoencoderKl::load_with_config`].
    ///
    /// Every VAE tensor of the files must be used: leftovers mean the config does not fit.
    pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_inner(path, None, dtype, device)
    }

    /// Like [`AutoencoderKl::load`], with the config given rather than read or inferred.
    pub fn load_with_config(
        path: &Path,
        config: VaeConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        Self::load_inner(path, Some(config), dtype, device)
    }

    fn load_inner(
        path: &Path,
        config: Option<VaeConfig>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        check_model_dtype(dtype)?;
        let (tensors, config, prefix) = open_vae(path, config)?;
        let vae = Self::new(&config, tensors.var_builder(dtype, device))?;
        let leftovers: Vec<String> = tensors
            .unused_tensors()
            .into_iter()
            .filter(|name| {
                name.strip_prefix(prefix.as_str()).is_some_and(|rest| {
                    ["encoder.", "decoder.", "quant_conv.", "post_quant_conv."]
                        .iter()
                        .any(|p| rest.starts_with(p))
                })
            })
            .collect();
        if !leftovers.is_empty() {
            return Err(FluxError::VaeConfig {
                path: Some(path.to_path_buf()),
                message: format!(
                    "the config does not use {} VAE tensor(s) of the checkpoint ({}{}): \
                     the weights are for another config",
                    leftovers.len(),
                    leftovers[..leftovers.len().min(3)].join(", "),
                    if leftovers.len() > 3 { ", ..." } else { "" }
                ),
            });
        }
        Ok(vae)
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    /// The config's shift factor, 0 when it has none.
    pub fn shift_factor(&self) -> f64 {
        self.config.shift_factor.unwrap_or(0.0)
    }

    /// Encodes images `[B, in_channels, H, W]` (pixels in [-1, 1]; cast to the VAE's dtype and
    /// device) into the latent posterior.
    pub fn encode(&self, x: &Tensor) -> Result<Posterior> {
        self.check_input(x, self.config.in_channels, "image")?;
        let x = x.to_device(&self.device)?.to_dtype(self.dtype)?;
        let mut moments = self.encoder.forward(&x)?;
        if let Some(quant_conv) = &self.quant_conv {
            moments = quant_conv.forward(&moments)?;
        }
        let latent = self.config.latent_channels;
        Ok(Posterior {
            mean: moments.narrow(1, 0, latent)?,
            logvar: moments
                .narrow(1, latent, latent)?
                .clamp(LOGVAR_RANGE.0, LOGVAR_RANGE.1)?,
        })
    }

    /// Decodes VAE latents `[B, latent_channels, h, w]` (not the transformer's scaled ones: see
    /// [`AutoencoderKl::unscale_latents`]) into images `[B, out_channels, 8h, 8w]`, unclamped.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.check_input(z, self.config.latent_channels, "latents")?;
        let mut z = z.to_device(&self.device)?.to_dtype(self.dtype)?;
        if let Some(post_quant_conv) = &self.post_quant_conv {
            z = post_quant_conv.forward(&z)?;
        }
        Ok(self.decoder.forward(&z)?)
    }

    /// VAE latents to the transformer's: `(z - shift) * scale`, rounding to `z`'s dtype after
    /// each step as PyTorch does.
    pub fn scale_latents(&self, z: &Tensor) -> Result<Tensor> {
        let shifted = round_through_f32(z, |t| t - self.shift_factor())?;
        round_through_f32(&shifted, |t| t * self.scaling_factor())
    }

    /// The transformer's latents to the VAE's: `z / scale + shift`.
    pub fn unscale_latents(&self, z: &Tensor) -> Result<Tensor> {
        let scaled = round_through_f32(z, |t| t / self.scaling_factor())?;
        round_through_f32(&scaled, |t| t + self.shift_factor())
    }

    fn check_input(&self, x: &Tensor, channels: usize, what: &str) -> Result<()> {
        match x.dims() {
            &[_, c, h, w] if c == channels && h > 0 && w > 0 => Ok(()),
            dims => Err(FluxError::Input(format!(
                "VAE {what} must be [batch, {channels}, height, width], got {dims:?}"
            ))),
        }
    }
}

/// Applies a scalar op in f32 and rounds back to `x`'s dtype (PyTorch's opmath for half types;
/// candle would round the scalar itself to the half type first).
fn round_through_f32(x: &Tensor, op: impl Fn(Tensor) -> CResult<Tensor>) -> Result<Tensor> {
    Ok(op(x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?)
}

// ---------------------------------------------------------------------------------------------
// Checkpoints

/// Where a bundled single file may keep its VAE tensors.
const SINGLE_FILE_PREFIXES: [&str; 3] = ["", "first_stage_model.", "vae."];
const BFL_VAE_FILE: &str = "ae.safetensors";

/// The name of a diffusers `AutoencoderKL` tensor in BFL/LDM naming (`ae.safetensors`), for a
/// VAE with `levels` resolution levels (the LDM decoder numbers its levels from the bottom).
pub(crate) fn ldm_name(name: &str, levels: usize) -> Option<String> {
    let (part, rest) = name.split_once('.')?;
    if matches!(part, "quant_conv" | "post_quant_conv") {
        return Some(name.to_string());
    }
    if !matches!(part, "encoder" | "decoder") {
        return None;
    }
    let (module, param) = rest.rsplit_once('.')?;
    let resnet = |rest: &str| -> Option<(String, &'static str)> {
        let (j, sub) = rest.strip_prefix("resnets.")?.split_once('.')?;
        let sub = match sub {
            "norm1" => "norm1",
            "conv1" => "conv1",
            "norm2" => "norm2",
            "conv2" => "conv2",
            "conv_shortcut" => "nin_shortcut",
            _ => return None,
        };
        Some((j.to_string(), sub))
    };
    let mapped = match module {
        "conv_in" | "conv_out" => module.to_string(),
        "conv_norm_out" => "norm_out".to_string(),
        _ => {
            if let Some(rest) = module.strip_prefix("mid_block.") {
                if let Some(sub) = rest.strip_prefix("attentions.0.") {
                    let sub = match sub {
                        "group_norm" => "norm",
                        "to_q" => "q",
                        "to_k" => "k",
                        "to_v" => "v",
                        "to_out.0" => "proj_out",
                        _ => return None,
                    };
                    format!("mid.attn_1.{sub}")
                } else {
                    let (j, sub) = resnet(rest)?;
                    let block = match j.as_str() {
                        "0" => "block_1",
                        "1" => "block_2",
                        _ => return None,
                    };
                    format!("mid.{block}.{sub}")
                }
            } else if let Some(rest) = module.strip_prefix("down_blocks.") {
                let (i, rest) = rest.split_once('.')?;
                if part != "encoder" {
                    return None;
                }
                if rest == "downsamplers.0.conv" {
                    format!("down.{i}.downsample.conv")
                } else {
                    let (j, sub) = resnet(rest)?;
                    format!("down.{i}.block.{j}.{sub}")
                }
            } else if let Some(rest) = module.strip_prefix("up_blocks.") {
                let (i, rest) = rest.split_once('.')?;
                let i: usize = i.parse().ok()?;
                if part != "decoder" || i >= levels {
                    return None;
                }
                let level = levels - 1 - i;
                if rest == "upsamplers.0.conv" {
                    format!("up.{level}.upsample.conv")
                } else {
                    let (j, sub) = resnet(rest)?;
                    format!("up.{level}.block.{j}.{sub}")
                }
            } else {
                return None;
            }
        }
    };
    Some(format!("{part}.{mapped}.{param}"))
}

/// Opens the VAE tensors at `path` (see [`AutoencoderKl::load`]); returns them under diffusers
/// names, the config, and the prefix of the VAE tensors in the files.
fn open_vae(path: &Path, config: Option<VaeConfig>) -> Result<(MappedTensors, VaeConfig, String)> {
    let meta = std::fs::metadata(path).map_err(|source| FluxError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return open_single_file(path, config);
    }
    let dir = if path.join("vae").is_dir() {
        path.join("vae")
    } else {
        path.to_path_buf()
    };
    let config_path = dir.join("config.json");
    let diffusers_folder = config_path.is_file()
        || std::fs::read_dir(&dir)
            .map_err(|source| FluxError::Io {
                path: dir.clone(),
                source,
            })?
            .filter_map(|entry| entry.ok())
            .any(|entry| {
                entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with("diffusion_pytorch_model")
            });
    if !diffusers_folder && path.join(BFL_VAE_FILE).is_file() {
        return open_single_file(&path.join(BFL_VAE_FILE), config);
    }
    if config.is_none() && !config_path.is_file() {
        return Err(FluxError::VaeConfig {
            path: Some(config_path),
            message: format!(
                "missing: a diffusers VAE folder needs config.json next to its safetensors \
                 files (or give a pipeline folder with vae/, or a BFL {BFL_VAE_FILE})"
            ),
        });
    }
    let config = match config {
        Some(c) => c,
        None => VaeConfig::from_json_file(&config_path)?,
    };
    let files = TensorFiles::open(&diffusers_weight_files(&dir)?)?;
    Ok((MappedTensors::identity(files), config, String::new()))
}

fn open_single_file(
    path: &Path,
    config: Option<VaeConfig>,
) -> Result<(MappedTensors, VaeConfig, String)> {
    let files = TensorFiles::open(&[path.to_path_buf()])?;
    let bad = |message: String| FluxError::VaeConfig {
        path: Some(path.to_path_buf()),
        message,
    };
    let names: Vec<String> = files.names().map(str::to_string).collect();
    let has_prefix = |p: &str| names.iter().any(|n| n.starts_with(p));
    let found = SINGLE_FILE_PREFIXES.iter().find_map(|p| {
        if has_prefix(&format!("{p}encoder.down.")) {
            Some((p.to_string(), true))
        } else if has_prefix(&format!("{p}encoder.down_blocks.")) {
            Some((p.to_string(), false))
        } else {
            None
        }
    });
    let Some((prefix, bfl)) = found else {
        return Err(bad(
            "no VAE tensors found (expected `encoder.down.*` as in BFL's ae.safetensors, or \
             diffusers' `encoder.down_blocks.*`)"
                .into(),
        ));
    };
    // Levels as the file numbers them: the decoder's LDM numbering depends on it.
    let level_prefix = format!(
        "{prefix}encoder.{}",
        if bfl { "down." } else { "down_blocks." }
    );
    let levels = names
        .iter()
        .filter_map(|n| n.strip_prefix(level_prefix.as_str()))
        .filter_map(|rest| rest.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(0, |max| max + 1);
    let stored_prefix = prefix.clone();
    let tensors = MappedTensors::new(files, move |name| {
        let stored = if bfl {
            ldm_name(name, levels)?
        } else {
            name.to_string()
        };
        Some(format!("{stored_prefix}{stored}"))
    });
    let config = match config {
        Some(c) => c,
        None => infer_config(&tensors).map_err(|e| match e {
            FluxError::VaeConfig { message, .. } => bad(message),
            other => other,
        })?,
    };
    Ok((tensors, config, prefix))
}

/// Reads a config off the tensor shapes (asked for by diffusers names). Norm groups cannot be
/// seen in the weights: FLUX's 32 is assumed when it divides every width. The scaling and shift
/// factors are FLUX's.
fn infer_config(tensors: &MappedTensors) -> Result<VaeConfig> {
    let fail = |message: String| FluxError::VaeConfig {
        path: None,
        message,
    };
    let shape = |name: &str| -> Result<Vec<usize>> {
        tensors.shape(name).map(<[usize]>::to_vec).ok_or_else(|| {
            let stored = tensors
                .stored_name(name)
                .unwrap_or_else(|| name.to_string());
            FluxError::MissingTensor {
                read_as: (stored != name).then(|| name.to_string()),
                name: stored,
                files: tensors.files().paths().to_vec(),
            }
        })
    };
    let block_out_channels: Vec<usize> = (0..)
        .map(|i| format!("encoder.down_blocks.{i}.resnets.0.conv1.weight"))
        .map_while(|name| tensors.shape(&name).map(|s| s[0]))
        .collect();
    if block_out_channels.is_empty() {
        return Err(fail("no encoder resnets found".into()));
    }
    let layers_per_block = (0..)
        .take_while(|j| {
            tensors.contains(&format!("encoder.down_blocks.0.resnets.{j}.conv1.weight"))
        })
        .count();
    let norm_num_groups = VaeConfig::flux().norm_num_groups;
    if block_out_channels.iter().any(|c| c % norm_num_groups != 0) {
        return Err(fail(format!(
            "the number of norm groups cannot be read off the weights, and FLUX's \
             {norm_num_groups} does not divide the widths {block_out_channels:?}: give a config \
             (AutoencoderKl::load_with_config)"
        )));
    }
    let n = block_out_channels.len();
    let config = VaeConfig {
        in_channels: shape("encoder.conv_in.weight")?[1],
        out_channels: shape("decoder.conv_out.weight")?[0],
        down_block_types: vec![DOWN_BLOCK.into(); n],
        up_block_types: vec![UP_BLOCK.into(); n],
        block_out_channels,
        layers_per_block,
        latent_channels: shape("encoder.conv_out.weight")?[0] / 2,
        norm_num_groups,
        use_quant_conv: tensors.contains("quant_conv.weight"),
        use_post_quant_conv: tensors.contains("post_quant_conv.weight"),
        mid_block_add_attention: tensors.contains("encoder.mid_block.attentions.0.to_q.weight"),
        ..VaeConfig::flux()
    };
    config.validate()?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use candle_core::DType;
    use candle_nn::VarBuilder;

    use super::{attention, conv2d_cpu, conv2d_in_bands, ldm_name, GroupNorm};

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        crate::compare::max_abs_diff(a, b).unwrap()
    }

    /// The generic path's convolution in bands of output rows (one row, a few, all) equals one
    /// call on the padded input, for the strides and paddings the VAE uses and odd ones.
    #[test]
    fn banded_convolution_equals_one_call() {
        for (h, w, k, stride, pad) in [
            (9, 7, 3, 1, [1, 1, 1, 1]),
            (10, 12, 3, 2, [0, 1, 0, 1]),
            (9, 7, 3, 2, [0, 1, 0, 1]),
            (6, 5, 3, 1, [2, 0, 1, 3]),
            (5, 4, 1, 1, [0, 0, 0, 0]),
            (2, 3, 3, 1, [1, 1, 1, 1]),
        ] {
            let x = icedit_test_support::randn(0f32, 1.0, (2, 3, h, w));
            let weight = icedit_test_support::randn(0f32, 1.0, (4, 3, k, k));
            let [top, bottom, left, right] = pad;
            let want = x
                .pad_with_zeros(2, top, bottom)
                .unwrap()
                .pad_with_zeros(3, left, right)
                .unwrap()
                .conv2d(&weight, 0, stride, 1, 1)
                .unwrap();
            for band_bytes in [1, 500, 2000, usize::MAX] {
                let ours = conv2d_in_bands(&x, &weight, stride, pad, band_bytes).unwrap();
                assert_eq!(ours.dims(), want.dims(), "{pad:?} stride {stride}");
                let err = max_abs_diff(&ours, &want);
                assert!(
                    err < 1e-5,
                    "{pad:?} stride {stride} bands {band_bytes}: {err}"
                );
            }
        }
    }

    /// The CPU group norm kernel against the op-by-op version used on other devices.
    #[test]
    fn cpu_group_norm_matches_ops() {
        let dev = Device::Cpu;
        let weights = std::collections::HashMap::from([
            (
                "weight".to_string(),
                icedit_test_support::randn(1f32, 0.5, 12),
            ),
            (
                "bias".to_string(),
                icedit_test_support::randn(0f32, 0.5, 12),
            ),
        ]);
        let norm =
            GroupNorm::new(3, 12, VarBuilder::from_tensors(weights, DType::F32, &dev)).unwrap();
        let x = (icedit_test_support::randn(0f32, 2.0, (2, 12, 5, 7)) + 3.0).unwrap();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let x = x.to_dtype(dtype).unwrap();
            for silu in [false, true] {
                let ours = norm.forward_cpu(&x, silu).unwrap();
                let ops = norm.forward_ops(&x, silu).unwrap();
                assert_eq!(ours.dtype(), dtype);
                // Two half-precision steps (ulps) at the largest output: the inputs are random
                // (outputs reach about 10), and one rounding may differ between the two paths.
                let largest = ops.to_dtype(DType::F32).unwrap().abs().unwrap();
                let largest = largest.max_all().unwrap().to_scalar::<f32>().unwrap();
                let tol = match dtype {
                    DType::BF16 => largest / 64.0,
                    DType::F16 => largest / 512.0,
                    _ => 1e-5,
                };
                let err = max_abs_diff(&ours, &ops);
                assert!(err < tol, "{dtype:?} silu {silu}: {err}");
            }
        }
    }

    /// Query chunks change nothing but the memory held.
    #[test]
    fn attention_chunks_agree() {
        let qkv = |s: usize| icedit_test_support::randn(0f32, 1.0, (2, s, 8));
        let (q, k, v) = (qkv(37), qkv(29), qkv(29));
        let whole = attention(&q, &k, &v, usize::MAX / 2).unwrap();
        // 5 query rows per chunk: 8 chunks, the last of 2 rows.
        let chunked = attention(&q, &k, &v, 2 * 29 * 4 * 5).unwrap();
        assert!(max_abs_diff(&whole, &chunked) < 1e-6);
        // Against the definition.
        let scores = (q.matmul(&k.t().unwrap()).unwrap() / 8f64.sqrt()).unwrap();
        let want = candle_nn::ops::softmax_last_dim(&scores)
            .unwrap()
            .matmul(&v)
            .unwrap();
        assert!(max_abs_diff(&whole, &want) < 1e-5);
    }

    #[test]
    fn cpu_conv_matches_candle() {
        // (batch, in, out, h, w, kernel, stride, [top, bottom, left, right])
        let cases = [
            (2, 5, 7, 9, 11, 3, 1, [1; 4]),
            (1, 4, 6, 8, 6, 1, 1, [0; 4]),
            (1, 3, 4, 9, 7, 3, 2, [0, 1, 0, 1]),
            (2, 6, 3, 10, 12, 3, 2, [0, 1, 0, 1]),
            (1, 2, 3, 1, 1, 3, 1, [1; 4]),
            (1, 3, 2, 6, 5, 3, 1, [2, 0, 1, 3]),
        ];
        for (b, ci, co, h, w, k, stride, pad) in cases {
            let x = icedit_test_support::randn(0f32, 1.0, (b, ci, h, w));
            let weight = icedit_test_support::randn(0f32, 1.0, (co, ci, k, k));
            let bias = icedit_test_support::randn(0f32, 1.0, co);
            let ours = conv2d_cpu(&x, &weight, &bias, stride, pad).unwrap();
            let [top, bottom, left, right] = pad;
            let padded = x
                .pad_with_zeros(2, top, bottom)
                .unwrap()
                .pad_with_zeros(3, left, right)
                .unwrap();
            let want = padded
                .conv2d(&weight, 0, stride, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, co, 1, 1)).unwrap())
                .unwrap();
            assert_eq!(ours.dims(), want.dims(), "{pad:?} stride {stride}");
            let err = (ours - want)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(err < 1e-4, "{pad:?} stride {stride}: {err}");
        }
    }

    #[test]
    fn ldm_names() {
        let cases = [
            ("encoder.conv_in.weight", "encoder.conv_in.weight"),
            ("decoder.conv_norm_out.bias", "decoder.norm_out.bias"),
            (
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                "encoder.down.1.block.0.nin_shortcut.weight",
            ),
            (
                "encoder.down_blocks.2.downsamplers.0.conv.bias",
                "encoder.down.2.downsample.conv.bias",
            ),
            (
                "decoder.mid_block.attentions.0.to_out.0.weight",
                "decoder.mid.attn_1.proj_out.weight",
            ),
            (
                "encoder.mid_block.attentions.0.group_norm.weight",
                "encoder.mid.attn_1.norm.weight",
            ),
            (
                "decoder.mid_block.resnets.1.norm2.weight",
                "decoder.mid.block_2.norm2.weight",
            ),
            (
                "decoder.up_blocks.0.resnets.2.conv1.weight",
                "decoder.up.3.block.2.conv1.weight",
            ),
            (
                "decoder.up_blocks.2.upsamplers.0.conv.weight",
                "decoder.up.1.upsample.conv.weight",
            ),
            ("quant_conv.weight", "quant_conv.weight"),
        ];
        for (diffusers, ldm) in cases {
            assert_eq!(ldm_name(diffusers, 4).as_deref(), Some(ldm), "{diffusers}");
        }
        for unknown in [
            "decoder.up_blocks.4.resnets.0.conv1.weight",
            "decoder.down_blocks.0.resnets.0.conv1.weight",
            "encoder.mid_block.resnets.2.conv1.weight",
            "text_model.weight",
        ] {
            assert_eq!(ldm_name(unknown, 4), None, "{unknown}");
        }
    }
}
