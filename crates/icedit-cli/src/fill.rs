//! `icedit fill`: inpainting and outpainting with FLUX.1 Fill.

use std::path::PathBuf;

use anyhow::{bail, Result};
use icedit_flux::parse_dtype;
use icedit_hub::HubOptions;
use icedit_image::resize::{resize_gray, Filter};
use icedit_pipeline::canvas::{self, Margins};
use icedit_pipeline::image_io::{self, load_mask, load_rgb, save_png};
use icedit_pipeline::recipe::Recipe;
use icedit_pipeline::{EditSettings, FillRequest, InitialNoise};

use crate::inputs::{add_model_inputs, check_png_name, random_seed, read_latents};
use crate::outputs::{Inputs, Outputs};
use crate::progress::Reporter;
use crate::{device, device_name, ModelArgs};

#[derive(clap::Args)]
pub struct FillArgs {
    /// The image to inpaint or outpaint (PNG, JPEG, WebP, BMP, TIFF).
    #[arg(long)]
    image: PathBuf,
    /// White (>= 50% gray) where the image is to be regenerated. Required unless --expand.
    #[arg(long)]
    mask: Option<PathBuf>,
    /// Outpaint: grow the canvas by L,T,R,B pixels (or one number for all sides); the new area
    /// is generated.
    #[arg(long, value_name = "L,T,R,B")]
    expand: Option<String>,
    /// What the regenerated area should show.
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 50)]
    steps: usize,
    #[arg(long, default_value_t = 30.0)]
    guidance: f32,
    /// Noise seed (torch-compatible: the same seed gives diffusers' noise). Random if omitted.
    #[arg(long)]
    seed: Option<u64>,
    /// Initial latents instead of seeded noise: a safetensors file with a float32 tensor
    /// `latents` of shape [1, 16, H/8, W/8]. --seed still seeds the VAE sampling (default 0).
    #[arg(long, value_name = "FILE")]
    latents: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// Resize a mask of another size to the image's size instead of failing.
    #[arg(long)]
    resize_mask: bool,
    /// Where to write the result (PNG).
    #[arg(long)]
    out: PathBuf,
    /// No progress output.
    #[arg(long)]
    quiet: bool,
}

pub fn run(args: FillArgs) -> Result<()> {
    let reporter = Reporter::new(args.quiet);
    if args.prompt.trim().is_empty() {
        bail!("--prompt is empty; describe what the masked area should show");
    }
    EditSettings {
        steps: args.steps,
        guidance: args.guidance,
        max_sequence_length: args.model.max_seq_len,
    }
    .validate()?;
    let dtype = parse_dtype(&args.model.dtype)?;
    let device = device(args.model.device)?;
    args.model.memory_budget()?;
    let margins = args.expand.as_deref().map(Margins::parse).transpose()?;

    // Where the result goes, checked against every input before anything is read or loaded.
    check_png_name(&args.out)?;
    let hub = HubOptions::from_env();
    let mut inputs = Inputs::default();
    inputs.file("--image", &args.image);
    if let Some(mask) = &args.mask {
        inputs.file("--mask", mask);
    }
    if let Some(latents) = &args.latents {
        inputs.file("--latents", latents);
    }
    add_model_inputs(&mut inputs, &args.model, &hub)?;
    let mut outputs = Outputs::default();
    outputs.file("--out", &args.out);
    outputs.check(&inputs)?;

    // Inputs first: a bad image should fail before minutes of model loading.
    let source = load_rgb(&args.image)?;
    for note in &source.notes {
        reporter.note(&format!("{}: {note}", args.image.display()));
    }
    let mut mask = match &args.mask {
        Some(path) => Some(load_mask(path)?),
        None if margins.is_some() => None,
        None => bail!("give --mask (white where to regenerate), or --expand to outpaint"),
    };
    if let Some(m) = &mask {
        if m.dimensions() != source.rgb.dimensions() {
            let (iw, ih) = source.rgb.dimensions();
            let (mw, mh) = m.dimensions();
            if !args.resize_mask {
                bail!(
                    "the mask is {mw}x{mh} but the image is {iw}x{ih}; give a mask of the same size, \
                     or pass --resize-mask to stretch it"
                );
            }
            reporter.note(&format!("mask resized from {mw}x{mh} to {iw}x{ih}"));
            mask = Some(resize_gray(m, iw, ih, Filter::Lanczos));
        }
    }
    let (image, mask) = match margins {
        Some(m) if !m.is_empty() => canvas::expand(&source.rgb, mask.as_ref(), m)?,
        _ => {
            let (w, h) = source.rgb.dimensions();
            (
                source.rgb,
                mask.unwrap_or_else(|| image::GrayImage::new(w, h)),
            )
        }
    };
    image_io::check_size(image.width(), image.height(), "the canvas")?;
    if let Some(warning) = image_io::aspect_warning(image.width(), image.height(), "the canvas") {
        reporter.warn(&warning);
    }
    let (image, mask, note) = canvas::fit_to_grid(image, mask);
    if let Some(note) = note {
        reporter.note(&note);
    }
    if image_io::binarize(&mask).iter().all(|&v| v == 0.0) {
        reporter.warn("the mask is empty (all black): nothing will be regenerated on purpose");
    }
    let latents = args.latents.as_deref().map(read_latents).transpose()?;
    let seed = args
        .seed
        .unwrap_or_else(|| if latents.is_some() { 0 } else { random_seed() });
    let noise = match latents {
        Some(latents) => InitialNoise::Latents { latents, seed },
        None => InitialNoise::Seed(seed),
    };

    let pipeline = args.model.open(&hub, dtype, &device)?;
    if pipeline.kind() != icedit_pipeline::PipelineKind::Fill {
        bail!(
            "{} is a {} model; icedit fill runs FLUX.1 Fill (for a masked Kontext edit use \
             `icedit edit --mask`)",
            args.model.model,
            pipeline.kind().name()
        );
    }
    let mut opened = args.model.fetch_weights(pipeline, &hub)?;
    let pixels = image.width() as u64 * image.height() as u64;
    args.model.apply_memory(
        &mut opened,
        crate::RunSize {
            image_tokens: pixels / 256,
            text_encoders_kept: false,
            text_tokens: args.model.max_seq_len as u64,
            pixels,
        },
        &reporter,
    )?;
    let model_recipe = opened.recipe(dtype, args.model.max_seq_len);
    let mut pipeline = opened.pipeline;
    let request = FillRequest {
        image: &image,
        mask: &mask,
        prompt: &args.prompt,
        steps: args.steps,
        guidance: args.guidance,
        noise,
        max_sequence_length: args.model.max_seq_len,
    };
    reporter.note(&format!(
        "{}x{} on {}, {} steps, guidance {}, seed {seed}",
        image.width(),
        image.height(),
        device_name(&device),
        args.steps,
        args.guidance
    ));
    let output = pipeline.fill(&request, &mut reporter.callback())?;
    for dropped in &output.truncation {
        reporter.warn(dropped);
    }

    let recipe = Recipe {
        task: if margins.is_some_and(|m| !m.is_empty()) {
            "outpaint"
        } else {
            "fill"
        }
        .into(),
        prompt: args.prompt.clone(),
        seed,
        latents: args.latents.as_ref().map(|p| p.display().to_string()),
        steps: args.steps,
        guidance: args.guidance,
        mask: args.mask.as_ref().map(|p| p.display().to_string()),
        width: image.width(),
        height: image.height(),
        expand: margins.map(|m| [m.left, m.top, m.right, m.bottom]),
        ..model_recipe
    };
    save_png(&args.out, &output.image, &recipe.png_metadata())?;
    reporter.done(&format!("wrote {}", args.out.display()));
    Ok(())
}
