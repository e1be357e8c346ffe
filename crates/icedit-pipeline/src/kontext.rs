//! FLUX.1 Kontext [dev] (../shared/SPEC.md): the photo is VAE-encoded and its tokens follow the
//! noise tokens in the sequence, as diffusers' `FluxKontextPipeline` (0.42.1) computes it; with a
//! mask, the latents outside it are blended back to the photo's after each step, as
//! `FluxKontextInpaintPipeline` does. A thin layer on [`FluxPipeline`]'s denoising loop.

use candle_core::{DType, Tensor};
use icedit_image::resize::{resize_gray, resize_rgb, Filter};
use icedit_text::TextConditioning;
use image::{GrayImage, RgbImage};

use crate::error::{PipelineError, Result};
use crate::image_io::{binarize, check_size};
use crate::latents::{image_ids, pack, pixels_to_tensor, PIXELS_PER_TOKEN, VAE_SCALE};
use crate::pipeline::{
    pixels_key, Condition, Denoising, FluxPipeline, InitialNoise, KeepOutside, PipelineKind,
    Progress, RunSetup, LATENT_CHANNELS,
};
use crate::torch_rng::TorchGenerator;

/// The resolutions Kontext was trained at (diffusers' `PREFERRED_KONTEXT_RESOLUTIONS`, width x
/// height); the photo is resized to the one of nearest aspect ratio.
pub const PREFERRED_RESOLUTIONS: [(u32, u32); 17] = [
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
];

/// The output's pixel budget when none is given (diffusers' `max_area`).
pub const DEFAULT_MAX_AREA: u64 = 1024 * 1024;

/// Guidance of BFL's Kontext examples and of diffusers' own usage example. (diffusers'
/// `__call__` signature defaults to 3.5, FLUX.1 dev's value.)
pub const DEFAULT_GUIDANCE: f32 = 2.5;

/// The side diffusers assumes for a missing width or height (`default_sample_size` 128 x 8).
const DEFAULT_SIDE: u32 = 1024;

const GRID: u32 = PIXELS_PER_TOKEN as u32;

/// The size the photo is resized to before encoding: floored to multiples of 16, and with
/// `auto_resize` (diffusers' `_auto_resize`, on by default) the preferred resolution of the
/// nearest aspect ratio.
pub fn photo_size(width: u32, height: u32, auto_resize: bool) -> Result<(u32, u32)> {
    let (w, h) = (width / GRID * GRID, height / GRID * GRID);
    if w == 0 || h == 0 {
        return Err(PipelineError::Input(format!(
            "the photo is {width}x{height}; Kontext needs at least {GRID}x{GRID} pixels"
        )));
    }
    if !auto_resize {
        return Ok((w, h));
    }
    let aspect = w as f64 / h as f64;
    // Python's min over (distance, w, h) tuples: ties go to the smaller width.
    let (_, pw, ph) = PREFERRED_RESOLUTIONS
        .iter()
        .map(|&(pw, ph)| ((aspect - pw as f64 / ph as f64).abs(), pw, ph))
        .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)))
        .expect("the table is not empty");
    Ok((pw / GRID * GRID, ph / GRID * GRID))
}

/// The generated image's size as diffusers computes it: the aspect ratio of `width` x `height`
/// (1024 for a side not given) at `max_area` pixels, each side floored to a multiple of 16.
/// `width` x `height` itself when `max_area` is their product.
pub fn output_size(width: Option<u32>, height: Option<u32>, max_area: u64) -> Result<(u32, u32)> {
    let (w, h) = (
        width.unwrap_or(DEFAULT_SIDE),
        height.unwrap_or(DEFAULT_SIDE),
    );
    if w == 0 || h == 0 || max_area == 0 {
        return Err(PipelineError::Input(format!(
            "an output of {w}x{h} at {max_area} pixels is empty; give a positive size"
        )));
    }
    let aspect = w as f64 / h as f64;
    // Python: round((max_area * aspect) ** 0.5), ties to even.
    let side = |x: f64| x.powf(0.5).round_ties_even();
    let (out_w, out_h) = (
        side(max_area as f64 * aspect),
        side(max_area as f64 / aspect),
    );
    let floor = |x: f64| (x as u64 / GRID as u64 * GRID as u64).min(u32::MAX as u64) as u32;
    let (out_w, out_h) = (floor(out_w), floor(out_h));
    if out_w == 0 || out_h == 0 {
        return Err(PipelineError::Input(format!(
            "a {w}x{h} aspect ratio at {max_area} pixels leaves a side under {GRID} pixels; \
             give a larger --max-area or a squarer size"
        )));
    }
    check_size(out_w, out_h, "the Kontext output")?;
    Ok((out_w, out_h))
}

/// How a photo becomes a Kontext job.
#[derive(Debug, Clone)]
pub struct KontextOptions {
    /// Resize the photo to the nearest preferred Kontext resolution (diffusers' default).
    pub auto_resize: bool,
    /// The output's width and height before `max_area` scales them (default: the resized
    /// photo's, so that the edit keeps the photo's aspect ratio; diffusers' call assumes
    /// 1024x1024 when none is given).
    pub size: Option<(u32, u32)>,
    /// The output's pixel budget (default: `size`'s area when a size is given, so that it is
    /// exact, else [`DEFAULT_MAX_AREA`]).
    pub max_area: Option<u64>,
}

impl Default for KontextOptions {
    fn default() -> Self {
        Self {
            auto_resize: true,
            size: None,
            max_area: None,
        }
    }
}

/// A Kontext edit's inputs as the model sees them.
#[derive(Debug, Clone)]
pub struct KontextJob {
    /// The photo at its conditioning size (multiples of 16).
    pub photo: RgbImage,
    /// The generated image's size (multiples of 16); the photo's for a masked edit.
    pub width: u32,
    pub height: u32,
    /// For a masked edit: the region to regenerate at the photo's conditioning size (>= 128:
    /// regenerate).
    pub mask: Option<GrayImage>,
}

impl KontextJob {
    /// Prepares a photo of any size as diffusers does: the photo (and a mask of the photo's
    /// size) resized with Lanczos to [`photo_size`]; the output size by [`output_size`], or the
    /// photo's size for a masked edit (`FluxKontextInpaintPipeline` generates at the photo's
    /// size, whatever width and height are asked).
    pub fn new(
        photo: &RgbImage,
        mask: Option<&GrayImage>,
        options: &KontextOptions,
    ) -> Result<Self> {
        let (pw, ph) = photo_size(photo.width(), photo.height(), options.auto_resize)?;
        let resized = if photo.dimensions() == (pw, ph) {
            photo.clone()
        } else {
            resize_rgb(photo, pw, ph, Filter::Lanczos)
        };
        let mask = match mask {
            None => None,
            Some(mask) if mask.dimensions() != photo.dimensions() => {
                let (mw, mh) = mask.dimensions();
                return Err(PipelineError::Input(format!(
                    "the mask is {mw}x{mh} but the photo is {}x{}; give a mask of the photo's \
                     size (white = edit)",
                    photo.width(),
                    photo.height()
                )));
            }
            Some(mask) => {
                let resized = if mask.dimensions() == (pw, ph) {
                    mask.clone()
                } else {
                    resize_gray(mask, pw, ph, Filter::Lanczos)
                };
                if !binarize(&resized).iter().any(|&m| m > 0.0) {
                    return Err(PipelineError::Input(
                        "the mask selects nothing (no pixel at or above 128 after resizing to \
                         the photo's Kontext size); paint the region to edit white"
                            .into(),
                    ));
                }
                Some(resized)
            }
        };
        let (width, height) = if mask.is_some() {
            (pw, ph)
        } else {
            let size = options.size.unwrap_or((pw, ph));
            let max_area = options.max_area.unwrap_or(match options.size {
                Some((w, h)) => w as u64 * h as u64,
                None => DEFAULT_MAX_AREA,
            });
            output_size(Some(size.0), Some(size.1), max_area)?
        };
        Ok(Self {
            photo: resized,
            width,
            height,
            mask,
        })
    }
}

/// One Kontext run.
pub struct KontextRequest<'a> {
    pub job: &'a KontextJob,
    pub steps: usize,
    pub guidance: f32,
    pub noise: InitialNoise,
    /// True CFG (diffusers' `true_cfg_scale` > 1 with a negative prompt): the negative prompt's
    /// encoding and the scale; two transformer passes per step.
    pub true_cfg: Option<(&'a TextConditioning, f32)>,
}

impl FluxPipeline {
    /// Prepares a Kontext run up to its first step (see [`FluxPipeline::start`]): the noise
    /// (the seed's first draw: Kontext encodes the photo by its posterior mode, which draws
    /// nothing), the photo's tokens and ids, and the mask blending of a masked edit.
    pub fn start_kontext(
        &mut self,
        request: &KontextRequest,
        text: &TextConditioning,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Denoising> {
        if self.kind() != PipelineKind::Kontext {
            return Err(PipelineError::Input(format!(
                "a Kontext edit needs a FLUX.1 Kontext model; this one is {}",
                self.kind().name()
            )));
        }
        let job = request.job;
        check_job(job)?;
        if let Some((_, scale)) = request.true_cfg {
            if !scale.is_finite() || scale <= 1.0 {
                return Err(PipelineError::Input(format!(
                    "--true-cfg {scale}: true CFG takes a scale above 1 (1 turns it off)"
                )));
            }
        }
        let (dtype, device) = (self.dtype(), self.device().clone());
        let (h, w) = (
            job.height as usize / VAE_SCALE,
            job.width as usize / VAE_SCALE,
        );
        let shape = [1, LATENT_CHANNELS, h, w];
        let latents = match &request.noise {
            InitialNoise::Latents { latents, .. } => {
                if latents.dims() != shape {
                    return Err(PipelineError::Input(format!(
                        "the given latents are {:?}; a {}x{} Kontext output needs {shape:?}",
                        latents.dims(),
                        job.width,
                        job.height
                    )));
                }
                latents.to_device(&device)?.to_dtype(dtype)?
            }
            InitialNoise::Seed(seed) => TorchGenerator::new(*seed).randn(&shape, dtype, &device)?,
        };
        let latents = pack(&latents)?;

        let (pw, ph) = job.photo.dimensions();
        let key = pixels_key((pw, ph), &[job.photo.as_raw()]);
        let posterior = self.encode_cached(key, progress, |device| {
            let pixels = pixels_to_tensor(job.photo.as_raw(), ph as usize, pw as usize, device)?;
            Ok(pixels.to_dtype(dtype)?)
        })?;
        let photo = self.scale_latents(posterior.mode(), progress)?;
        icedit_flux::check_finite(&photo, dtype, || "in the VAE encoding of the photo".into())?;
        let photo = pack(&photo)?;
        let (rows, cols) = (
            ph as usize / PIXELS_PER_TOKEN,
            pw as usize / PIXELS_PER_TOKEN,
        );
        // The photo's ids are the noise tokens' with the first coordinate 1.
        let ids = image_ids(rows, cols, &device)?
            .broadcast_add(&Tensor::new(&[1f32, 0.0, 0.0], &device)?)?;

        let run = RunSetup {
            seed: request.noise_seed(),
            steps: request.steps,
            guidance: request.guidance,
            latent_size: (h, w),
        };
        let condition = Condition::Tokens {
            latents: photo.clone(),
            ids,
        };
        let mut state = self.new_state(run, latents.clone(), condition, text, request.true_cfg)?;
        if let Some(mask) = &job.mask {
            state.keep_outside(KeepOutside {
                mask: latent_mask(mask, &device)?.to_dtype(dtype)?,
                photo,
                noise: latents,
            });
        }
        Ok(state)
    }
}

impl KontextRequest<'_> {
    fn noise_seed(&self) -> u64 {
        match &self.noise {
            InitialNoise::Seed(seed) | InitialNoise::Latents { seed, .. } => *seed,
        }
    }
}

/// The mask as the latents see it, packed `[1, tokens, 64]`: binarized at 0.5, then each 8x8
/// cell takes its top-left pixel (torch's nearest `interpolate` down by 8), repeated over the
/// 16 latent channels.
fn latent_mask(mask: &GrayImage, device: &candle_core::Device) -> Result<Tensor> {
    let (w, h) = mask.dimensions();
    let binary = binarize(mask);
    let (lh, lw) = (h as usize / VAE_SCALE, w as usize / VAE_SCALE);
    let cells: Vec<f32> = (0..lh * lw)
        .map(|i| binary[(i / lw) * VAE_SCALE * w as usize + (i % lw) * VAE_SCALE])
        .collect();
    let cells = Tensor::from_vec(cells, (1, 1, lh, lw), device)?
        .repeat((1, LATENT_CHANNELS, 1, 1))?
        .to_dtype(DType::F32)?;
    pack(&cells)
}

fn check_job(job: &KontextJob) -> Result<()> {
    let on_grid = |w: u32, h: u32| w > 0 && h > 0 && w % GRID == 0 && h % GRID == 0;
    let (pw, ph) = job.photo.dimensions();
    if !on_grid(pw, ph) || !on_grid(job.width, job.height) {
        return Err(PipelineError::Input(format!(
            "the photo is {pw}x{ph} and the output {}x{}; both need positive multiples of \
             {GRID} (use KontextJob::new)",
            job.width, job.height
        )));
    }
    check_size(job.width, job.height, "the Kontext output")?;
    if let Some(mask) = &job.mask {
        if mask.dimensions() != (pw, ph) || (job.width, job.height) != (pw, ph) {
            return Err(PipelineError::Input(
                "a masked Kontext edit needs the mask and the output at the photo's size".into(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_size_is_exact_when_max_area_is_the_size() {
        for (w, h) in [(64, 48), (48, 32), (1024, 1024), (832, 1248), (16, 16)] {
            assert_eq!(
                output_size(Some(w), Some(h), w as u64 * h as u64).unwrap(),
                (w, h)
            );
        }
        assert_eq!(
            output_size(None, None, DEFAULT_MAX_AREA).unwrap(),
            (1024, 1024)
        );
        assert!(output_size(Some(4000), Some(16), 256).is_err());
    }

    #[test]
    fn photo_size_floors_then_picks_the_nearest_aspect() {
        assert_eq!(photo_size(64, 48, false).unwrap(), (64, 48));
        assert_eq!(photo_size(70, 50, false).unwrap(), (64, 48));
        assert_eq!(photo_size(1024, 1024, true).unwrap(), (1024, 1024));
        assert_eq!(photo_size(100, 4000, true).unwrap(), (672, 1568));
        assert_eq!(photo_size(4000, 100, true).unwrap(), (1568, 672));
        assert!(photo_size(15, 100, true).is_err());
    }
}
