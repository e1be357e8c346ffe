//! Instruction edits, one way per model over the one denoising loop:
//! - ICEdit's in-context diptych on FLUX.1 Fill (../shared/SPEC.md section 4): the source goes on
//!   the left of a diptych, the right half is masked and inpainted under the in-context prompt,
//!   and the right half of the result is the edit;
//! - FLUX.1 Kontext: the photo's tokens condition the whole output ([`crate::kontext`]).

use icedit_text::TextConditioning;
use image::{imageops, GrayImage, Luma, RgbImage};

use crate::error::{PipelineError, Result};
use crate::image_io::check_size;
use crate::kontext::KontextOptions;
use crate::kontext::{KontextJob, KontextRequest};
use crate::latents::PIXELS_PER_TOKEN;
use crate::masked::{ContextMargin, MaskedEdit};
use crate::pipeline::{Denoising, FillRequest, FluxPipeline, InitialNoise, PipelineKind, Progress};
use icedit_image::resize::{resize_rgb, Filter};

/// The prompt template the ICEdit adapters were trained with (prompts/icedit-diptych.txt), with
/// `{instruction}` where the instruction goes, as typed.
pub const DIPTYCH_TEMPLATE: &str = include_str!("../../../prompts/icedit-diptych.txt");

/// The width the ICEdit adapters were trained at.
pub const DEFAULT_WIDTH: u32 = 512;

/// The prompt templates adapter manifests can name (`prompt = "NAME"`, prompts/NAME.txt).
pub const PROMPT_TEMPLATES: [(&str, &str); 1] = [("icedit-diptych", DIPTYCH_TEMPLATE)];

/// The template a manifest names.
pub fn prompt_template(name: &str) -> Result<&'static str> {
    PROMPT_TEMPLATES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            let known: Vec<&str> = PROMPT_TEMPLATES.iter().map(|(n, _)| *n).collect();
            PipelineError::Input(format!(
                "unknown prompt template `{name}` (known: {})",
                known.join(", ")
            ))
        })
}

/// The template a set of adapters was trained with: the one their manifests name (`None`: no
/// manifest names one). Adapters trained with different templates cannot run together.
pub fn adapters_template(template_names: &[&str]) -> Result<Option<&'static str>> {
    let mut names = template_names.to_vec();
    names.sort_unstable();
    names.dedup();
    match names[..] {
        [] => Ok(None),
        [name] => Ok(Some(prompt_template(name)?)),
        _ => Err(PipelineError::Input(format!(
            "the adapters were trained with different prompt templates ({}); use one at a \
             time, or give the whole prompt",
            names.join(", ")
        ))),
    }
}

/// The in-context prompt for an instruction.
pub fn diptych_prompt(instruction: &str) -> Result<String> {
    templated_prompt(DIPTYCH_TEMPLATE, instruction)
}

/// A template with the instruction put in, as typed.
pub fn templated_prompt(template: &str, instruction: &str) -> Result<String> {
    if instruction.trim().is_empty() {
        return Err(PipelineError::Input(
            "the instruction is empty; say what to change, e.g. \"make it night\"".into(),
        ));
    }
    Ok(template.replace("{instruction}", instruction))
}

/// Size of each half: `width` wide (a multiple of 16), the height keeping the source's aspect
/// ratio, rounded to the nearest multiple of 16 and at least 16.
pub fn half_size(source_width: u32, source_height: u32, width: u32) -> Result<(u32, u32)> {
    let g = PIXELS_PER_TOKEN as u32;
    if width < g || width % g != 0 {
        return Err(PipelineError::Input(format!(
            "--width {width}: the width must be a positive multiple of {g} (the adapters were \
             trained at {DEFAULT_WIDTH})"
        )));
    }
    if source_width == 0 || source_height == 0 {
        return Err(PipelineError::Input("the source image is empty".into()));
    }
    let exact = source_height as f64 * width as f64 / source_width as f64;
    // In u64: a huge --width or aspect ratio must fail the size check, not overflow.
    let height = ((exact / g as f64).round() as u64)
        .max(1)
        .saturating_mul(g as u64);
    let too_big = || {
        PipelineError::Input(format!(
            "the diptych of a {source_width}x{source_height} image at --width {width} would be \
             {}x{height}, far more than icedit runs on; use a smaller --width",
            2 * width as u64
        ))
    };
    let (Ok(diptych_width), Ok(height)) = (u32::try_from(2 * width as u64), u32::try_from(height))
    else {
        return Err(too_big());
    };
    check_size(diptych_width, height, "the diptych")?;
    Ok((width, height))
}

/// The diptych canvas and mask for one source image.
#[derive(Debug, Clone)]
pub struct Diptych {
    /// `2W x H`: the resized source on both halves (the right half is masked, so its content
    /// does not matter; ICEdit's reference puts the source there too).
    pub canvas: RgbImage,
    /// White on the right half.
    pub mask: GrayImage,
    /// The source at the half size (no copy made when it already had that size).
    pub half_width: u32,
    pub height: u32,
}

impl Diptych {
    /// Resizes the source (PIL's default bicubic, exactly, as ICEdit's script resizes) to
    /// `width` wide and builds the diptych.
    pub fn new(source: &RgbImage, width: u32) -> Result<Self> {
        let (w, h) = half_size(source.width(), source.height(), width)?;
        let resized;
        let half = if source.dimensions() == (w, h) {
            source
        } else {
            resized = resize_rgb(source, w, h, Filter::Bicubic);
            &resized
        };
        let mut canvas = RgbImage::new(2 * w, h);
        imageops::replace(&mut canvas, half, 0, 0);
        imageops::replace(&mut canvas, half, w as i64, 0);
        let mask = GrayImage::from_fn(2 * w, h, |x, _| Luma([if x >= w { 255 } else { 0 }]));
        Ok(Self {
            canvas,
            mask,
            half_width: w,
            height: h,
        })
    }

    /// The left half: the source at the half size, as the judge of a seed search sees it.
    pub fn source_half(&self) -> RgbImage {
        imageops::crop_imm(&self.canvas, 0, 0, self.half_width, self.height).to_image()
    }

    /// The right half of a generated diptych: the edited image.
    pub fn right_half(&self, output: &RgbImage) -> RgbImage {
        imageops::crop_imm(output, self.half_width, 0, self.half_width, self.height).to_image()
    }
}

/// Denoising settings of an edit.
#[derive(Debug, Clone)]
pub struct EditSettings {
    pub steps: usize,
    pub guidance: f32,
    pub max_sequence_length: usize,
}

/// Most denoising steps a run may ask for (FLUX runs 28 to 50; more only costs time).
pub const MAX_STEPS: usize = 1000;
/// T5's prompt length limit in FLUX (diffusers refuses longer).
pub const MAX_SEQUENCE_LENGTH: usize = 512;
/// Largest guidance accepted: FLUX's embedded guidance is trained up to about 100 (ICEdit uses
/// 50); far larger values only overflow.
pub const MAX_GUIDANCE: f32 = 1000.0;

impl EditSettings {
    /// Checks the numbers before anything is loaded or allocated.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(PipelineError::Input(m));
        if self.steps == 0 || self.steps > MAX_STEPS {
            return bad(format!(
                "--steps {}: the step count must be between 1 and {MAX_STEPS}",
                self.steps
            ));
        }
        if !self.guidance.is_finite() || self.guidance.abs() > MAX_GUIDANCE {
            return bad(format!(
                "--guidance {}: the guidance must be a finite number between -{MAX_GUIDANCE} and \
                 {MAX_GUIDANCE}",
                self.guidance
            ));
        }
        if self.max_sequence_length == 0 || self.max_sequence_length > MAX_SEQUENCE_LENGTH {
            return bad(format!(
                "--max-seq-len {}: the T5 prompt length must be between 1 and \
                 {MAX_SEQUENCE_LENGTH} tokens (T5's limit in FLUX)",
                self.max_sequence_length
            ));
        }
        Ok(())
    }
}

impl Default for EditSettings {
    /// ICEdit's reference call: 28 steps, guidance 50, 512 T5 tokens.
    fn default() -> Self {
        Self {
            steps: 28,
            guidance: ICEDIT_GUIDANCE,
            max_sequence_length: 512,
        }
    }
}

/// What an edit conditions on, carrying what it needs to hand back the edited image.
#[derive(Debug, Clone)]
pub enum EditJob {
    /// ICEdit on FLUX.1 Fill: the diptych, whose right half is the edit.
    Diptych(Diptych),
    /// ICEdit on FLUX.1 Fill inside a mask: the diptych of a window around it, stitched back
    /// into the photo at its own resolution ([`crate::masked`]).
    Masked(MaskedEdit),
    /// FLUX.1 Kontext: the photo as the model sees it; the whole output is the edit.
    Kontext(KontextJob),
}

impl EditJob {
    /// The model kind this job runs on.
    pub fn kind(&self) -> PipelineKind {
        match self {
            Self::Diptych(_) | Self::Masked(_) => PipelineKind::Fill,
            Self::Kontext(_) => PipelineKind::Kontext,
        }
    }

    /// The original as a judge compares against: the diptych's source half (the window's, for
    /// a masked edit), or Kontext's photo.
    pub fn original(&self) -> RgbImage {
        match self {
            Self::Diptych(d) => d.source_half(),
            Self::Masked(m) => m.diptych.source_half(),
            Self::Kontext(k) => k.photo.clone(),
        }
    }

    /// What a judge compares of a generated image: the edited part at the size the model made
    /// it (for a masked edit, the window's edit, not the stitched photo).
    pub fn judged(&self, generated: &RgbImage) -> RgbImage {
        match self {
            Self::Diptych(d) => d.right_half(generated),
            Self::Masked(m) => m.diptych.right_half(generated),
            Self::Kontext(_) => generated.clone(),
        }
    }

    /// The edited image from a generated one: the diptych's right half, the photo with the
    /// window's edit stitched in, or Kontext's whole output.
    pub fn edited(&self, generated: &RgbImage) -> RgbImage {
        match self {
            Self::Masked(m) => m.stitch(&m.diptych.right_half(generated)),
            _ => self.judged(generated),
        }
    }

    /// The size of the generated image (the whole diptych for ICEdit).
    pub fn generated_size(&self) -> (u32, u32) {
        match self {
            Self::Diptych(d) | Self::Masked(MaskedEdit { diptych: d, .. }) => {
                (2 * d.half_width, d.height)
            }
            Self::Kontext(k) => (k.width, k.height),
        }
    }

    /// Image tokens the transformer processes per pass: the generated image's, plus the
    /// photo's for Kontext.
    pub fn transformer_tokens(&self) -> usize {
        let tokens = |(w, h): (u32, u32)| (w as usize / 16) * (h as usize / 16);
        let photo = match self {
            Self::Kontext(k) => tokens(k.photo.dimensions()),
            _ => 0,
        };
        tokens(self.generated_size()) + photo
    }

    /// The diptych a Fill edit denoises.
    fn diptych(&self) -> Option<&Diptych> {
        match self {
            Self::Diptych(d) | Self::Masked(MaskedEdit { diptych: d, .. }) => Some(d),
            Self::Kontext(_) => None,
        }
    }
}

/// How a photo becomes an edit job, whatever asked for it (the CLI's flags, the server's forms
/// and JSON): validated here, in one place.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct JobOptions {
    /// ICEdit: the diptych half's width (default [`DEFAULT_WIDTH`]). Kontext: the output's
    /// width, with `height`.
    pub width: Option<u32>,
    /// Kontext: the output's height, with `width`.
    pub height: Option<u32>,
    /// Kontext: the output's pixel budget.
    pub max_area: Option<u64>,
    /// Kontext: resize the photo to the nearest training resolution.
    pub auto_resize: bool,
    /// Masked ICEdit edits: the window's margin and the blend's soft edge.
    pub context: ContextMargin,
    pub feather: u32,
}

/// A masked ICEdit edit's default margin: a quarter of the mask's longer side on each side.
pub const DEFAULT_CONTEXT: ContextMargin = ContextMargin::Fraction(0.25);
/// A masked ICEdit edit's default soft edge, in pixels.
pub const DEFAULT_FEATHER: u32 = 8;

impl Default for JobOptions {
    fn default() -> Self {
        Self {
            width: None,
            height: None,
            max_area: None,
            auto_resize: true,
            context: DEFAULT_CONTEXT,
            feather: DEFAULT_FEATHER,
        }
    }
}

impl EditJob {
    /// The job for `photo` on a model of `kind`: ICEdit's diptych, or a masked ICEdit edit
    /// when a mask is given; Kontext's photo conditioning (its own inpainting with a mask).
    pub fn new(
        kind: PipelineKind,
        photo: &RgbImage,
        mask: Option<&GrayImage>,
        options: &JobOptions,
    ) -> Result<Self> {
        match kind {
            PipelineKind::Fill => {
                if options.height.is_some() || options.max_area.is_some() {
                    return Err(PipelineError::Input(
                        "a height or pixel budget is for Kontext models; an ICEdit edit takes \
                         the diptych half's width"
                            .into(),
                    ));
                }
                let width = options.width.unwrap_or(DEFAULT_WIDTH);
                Ok(match mask {
                    Some(mask) => Self::Masked(MaskedEdit::new(
                        photo,
                        mask,
                        width,
                        options.context,
                        options.feather,
                    )?),
                    None => Self::Diptych(Diptych::new(photo, width)?),
                })
            }
            PipelineKind::Kontext => {
                if options.width.is_some() != options.height.is_some() {
                    return Err(PipelineError::Input(
                        "give the Kontext output's width and height together (or neither: the \
                         photo's aspect ratio)"
                            .into(),
                    ));
                }
                if mask.is_some() && (options.width.is_some() || options.max_area.is_some()) {
                    return Err(PipelineError::Input(
                        "a masked Kontext edit has the photo's size; drop the width, height and \
                         pixel budget"
                            .into(),
                    ));
                }
                let kontext = KontextOptions {
                    auto_resize: options.auto_resize,
                    size: options.width.zip(options.height),
                    max_area: options.max_area,
                };
                Ok(Self::Kontext(KontextJob::new(photo, mask, &kontext)?))
            }
        }
    }
}

impl EditSettings {
    /// The defaults of a model kind: 28 steps; guidance 50 for ICEdit (its paper), 2.5 for
    /// Kontext (BFL's examples).
    pub fn for_kind(kind: PipelineKind) -> Self {
        Self {
            guidance: match kind {
                PipelineKind::Fill => ICEDIT_GUIDANCE,
                PipelineKind::Kontext => crate::kontext::DEFAULT_GUIDANCE,
            },
            ..Self::default()
        }
    }
}

/// ICEdit's guidance (its paper and scripts).
pub const ICEDIT_GUIDANCE: f32 = 50.0;

/// The prompt of an edit, encoded, with an optional negative prompt for true CFG (Kontext:
/// two transformer passes per step, `negative + scale * (positive - negative)`).
#[derive(Clone, Copy)]
pub struct EditText<'a> {
    pub prompt: &'a str,
    pub encoded: &'a TextConditioning,
    pub true_cfg: Option<(&'a TextConditioning, f32)>,
}

impl<'a> EditText<'a> {
    pub fn new(prompt: &'a str, encoded: &'a TextConditioning) -> Self {
        Self {
            prompt,
            encoded,
            true_cfg: None,
        }
    }
}

pub struct EditOutput {
    /// The edited image: the diptych's right half, the stitched photo of a masked edit, or
    /// Kontext's whole output.
    pub edited: RgbImage,
    /// The whole generated image (the diptych for ICEdit).
    pub generated: RgbImage,
    /// Transformer passes of the run, and of those the ones computed in full.
    pub evaluations: usize,
    pub full_evaluations: usize,
    /// With a step cache: per guidance branch, whether each step was computed in full.
    pub computed_steps: Option<Vec<Vec<bool>>>,
}

impl FluxPipeline {
    /// Prepares one edit up to its first step, the way the job's model edits.
    pub fn start_edit(
        &mut self,
        job: &EditJob,
        text: &EditText,
        settings: &EditSettings,
        noise: InitialNoise,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Denoising> {
        if job.kind() != self.kind() {
            return Err(PipelineError::Input(format!(
                "this is a {} edit but the model is {}",
                job.kind().name(),
                self.kind().name()
            )));
        }
        settings.validate()?;
        match (job, job.diptych()) {
            (_, Some(diptych)) => {
                if text.true_cfg.is_some() {
                    return Err(PipelineError::Input(
                        "true CFG (a negative prompt) is for Kontext models; FLUX.1 Fill \
                         embeds its guidance"
                            .into(),
                    ));
                }
                let request = FillRequest {
                    image: &diptych.canvas,
                    mask: &diptych.mask,
                    prompt: text.prompt,
                    steps: settings.steps,
                    guidance: settings.guidance,
                    noise,
                    max_sequence_length: settings.max_sequence_length,
                };
                self.start(&request, text.encoded, progress)
            }
            (EditJob::Kontext(kontext), _) => {
                let request = KontextRequest {
                    job: kontext,
                    steps: settings.steps,
                    guidance: settings.guidance,
                    noise,
                    true_cfg: text.true_cfg,
                };
                self.start_kontext(&request, text.encoded, progress)
            }
            _ => unreachable!("every other job has a diptych"),
        }
    }

    /// One edit with an encoded prompt (encode once with [`FluxPipeline::encode_prompt`], then
    /// run as many seeds as wanted).
    pub fn edit(
        &mut self,
        job: &EditJob,
        text: &EditText,
        settings: &EditSettings,
        noise: InitialNoise,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<EditOutput> {
        let mut state = self.start_edit(job, text, settings, noise, progress)?;
        self.advance(&mut state, usize::MAX, progress)?;
        progress(Progress::Decoding);
        self.finish(job, &state)
    }

    /// The result of a finished run: decoded, the edit taken out (or stitched in), and what it
    /// cost.
    pub fn finish(&mut self, job: &EditJob, state: &Denoising) -> Result<EditOutput> {
        let generated = self.decode(state)?;
        Ok(EditOutput {
            edited: job.edited(&generated),
            generated,
            evaluations: state.evaluations(),
            full_evaluations: state.full_evaluations(),
            computed_steps: state.computed_steps(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_is_icedit_byte_for_byte() {
        assert_eq!(
            diptych_prompt("make it night").unwrap(),
            "A diptych with two side-by-side images of the same scene. On the right, the scene \
             is exactly the same as on the left but make it night"
        );
        // As typed: no trimming, no punctuation added.
        assert!(diptych_prompt(" Give him a red scarf.")
            .unwrap()
            .ends_with("left but  Give him a red scarf."));
        assert!(diptych_prompt("  ").is_err());
    }

    /// Found by tests/fuzz_parsers.rs: a huge --width or a very tall source overflowed u32.
    #[test]
    fn huge_half_sizes_are_refused_without_overflow() {
        for (sw, sh, width) in [
            (1, 15, 286331168),
            (1, 1, 1 << 31),
            (1, u32::MAX, 16),
            (16, 16, u32::MAX - 15),
            (1, u32::MAX, u32::MAX - 15),
        ] {
            let err = half_size(sw, sh, width).unwrap_err().to_string();
            assert!(err.contains("more than"), "{sw}x{sh} @ {width}: {err}");
        }
    }

    #[test]
    fn half_sizes_keep_the_aspect_ratio_on_the_16_grid() {
        // (source w, h, width) -> (w, h)
        let cases = [
            ((1024, 768, 512), (512, 384)), // landscape, exact
            ((768, 1024, 512), (512, 688)), // portrait: 682.7 -> 688
            ((500, 333, 512), (512, 336)),  // odd: 341.0 -> 336
            ((640, 427, 512), (512, 336)),  // 341.6 -> 336
            ((4000, 100, 512), (512, 16)),  // 12.8 -> 16 (at least one row of tokens)
            ((3, 2, 512), (512, 336)),      // tiny source, upscaled
            ((64, 48, 64), (64, 48)),       // already the size
            ((100, 3000, 64), (64, 1920)),  // tall
            ((512, 520, 512), (512, 528)),  // 520 is a tie between 512 and 528: rounds up
        ];
        for ((sw, sh, width), expected) in cases {
            assert_eq!(
                half_size(sw, sh, width).unwrap(),
                expected,
                "{sw}x{sh} @ {width}"
            );
        }
        for bad_width in [0, 8, 500] {
            let err = half_size(100, 100, bad_width).unwrap_err().to_string();
            assert!(err.contains("multiple of 16"), "{err}");
        }
        assert!(
            half_size(100, 100_000, 512).is_err(),
            "over the pixel limit"
        );
    }

    #[test]
    fn diptych_has_source_left_and_masked_right() {
        let source = RgbImage::from_fn(50, 30, |x, y| image::Rgb([x as u8 * 5, y as u8 * 8, 7]));
        let d = Diptych::new(&source, 64).unwrap();
        assert_eq!((d.half_width, d.height), (64, 32)); // 38.4 -> 32
        assert_eq!(d.canvas.dimensions(), (128, d.height));
        assert_eq!(d.mask.dimensions(), (128, d.height));
        for x in [0, 63] {
            assert_eq!(d.mask.get_pixel(x, 5)[0], 0);
            assert_eq!(d.mask.get_pixel(x + 64, 5)[0], 255);
            assert_eq!(d.canvas.get_pixel(x, 5), d.canvas.get_pixel(x + 64, 5));
        }
        // A source already at the half size is used as is.
        let exact = RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8, y as u8, 1]));
        let d = Diptych::new(&exact, 64).unwrap();
        assert_eq!(d.right_half(&d.canvas), exact);
    }
}
