//! The judge flags shared by `edit` (the seed search) and `judge`, and the `judge` command:
//! one comparison of two edits, to try a judge setup before a long search.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::Args;
use icedit_hub::HubOptions;
use icedit_judge::{
    build_judges, parse_judges, ClipScoring, Comparison, JudgeChain, JudgeSettings, JudgeSpec,
    OpenAiOptions, Preference, MAX_TIMEOUT, MAX_TRIES,
};
use icedit_pipeline::image_io::load_rgb;

use crate::{device, DeviceArg};

#[derive(Args)]
pub(crate) struct JudgeArgs {
    /// Judge(s) comparing edits: `openai:http://localhost:8000/v1#qwen2.5-vl-7b` (any
    /// OpenAI-compatible vision server; key from ICEDIT_JUDGE_API_KEY or OPENAI_API_KEY),
    /// `qwen3-vl[:MODEL]` (Qwen3-VL in-process, default Qwen/Qwen3-VL-2B-Instruct) or
    /// `clip[:MODEL]` (CLIP in-process, default openai/clip-vit-large-patch14). Commas list
    /// fallbacks. For `edit`: best-of-N, where `--seeds N` alone means N candidates from
    /// --seed on.
    #[arg(long, value_name = "SPEC")]
    pub judge: Option<String>,
    /// Seconds a judge server may take per answer (at most 3600).
    #[arg(long, default_value_t = 120.0, allow_negative_numbers = true)]
    pub judge_timeout: f64,
    /// Tries per comparison before falling back to the next judge (1 to 10).
    #[arg(long, default_value_t = 3)]
    pub judge_tries: usize,
    /// What the photo shows, for the clip judge: edits are scored along the direction from
    /// this caption to the instruction.
    #[arg(long, default_value = "a photo")]
    pub source_caption: String,
    /// How much the clip judge rewards similarity to the original (untouched regions)
    /// against following the instruction.
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    pub clip_similarity_weight: f64,
}

impl JudgeArgs {
    /// The parsed `--judge` list (None without one); bad specs and settings fail here,
    /// before any work.
    pub fn parse(&self) -> Result<Option<Vec<JudgeSpec>>> {
        if !(self.clip_similarity_weight.is_finite() && self.clip_similarity_weight >= 0.0) {
            bail!(
                "--clip-similarity-weight {} must be a number >= 0",
                self.clip_similarity_weight
            );
        }
        let max_timeout = MAX_TIMEOUT.as_secs_f64();
        if !(self.judge_timeout.is_finite()
            && self.judge_timeout > 0.0
            && self.judge_timeout <= max_timeout)
        {
            bail!(
                "--judge-timeout {} must be a positive number of seconds, at most {max_timeout}",
                self.judge_timeout
            );
        }
        if !(1..=MAX_TRIES).contains(&self.judge_tries) {
            bail!(
                "--judge-tries {} must be from 1 to {MAX_TRIES}",
                self.judge_tries
            );
        }
        Ok(match &self.judge {
            Some(spec) => Some(parse_judges(spec)?),
            None => None,
        })
    }

    /// Builds the chain; in-process judges load their models (in `dtype`, on `device`).
    pub fn build(
        &self,
        specs: &[JudgeSpec],
        hub: &HubOptions,
        device: &Device,
        dtype: DType,
    ) -> Result<JudgeChain> {
        Ok(build_judges(
            specs,
            &JudgeSettings {
                lookup: &|k| std::env::var(k).ok(),
                openai: OpenAiOptions {
                    // Checked by `parse`; never a panic if it was not.
                    timeout: Duration::try_from_secs_f64(self.judge_timeout).unwrap_or(MAX_TIMEOUT),
                    attempts: self.judge_tries,
                    ..Default::default()
                },
                hub: hub.clone(),
                device: device.clone(),
                dtype,
                clip: ClipScoring {
                    source_caption: self.source_caption.clone(),
                    similarity_weight: self.clip_similarity_weight,
                },
            },
        )?)
    }
}

#[derive(Args)]
pub struct JudgeCommandArgs {
    #[command(flatten)]
    judging: JudgeArgs,
    /// The edit that was asked for.
    #[arg(long)]
    instruction: String,
    /// The photo before editing.
    #[arg(long)]
    original: PathBuf,
    /// The two edits to compare (image 1 and image 2).
    #[arg(num_args = 2, value_names = ["FIRST", "SECOND"], required = true)]
    edits: Vec<PathBuf>,
    /// Precision of in-process vision-language judges: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceArg,
    /// Print the verdict as JSON on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(args: JudgeCommandArgs) -> Result<()> {
    if args.instruction.trim().is_empty() {
        bail!("--instruction is empty; give the edit that was asked for");
    }
    let Some(specs) = args.judging.parse()? else {
        bail!("give --judge (e.g. clip, qwen3-vl or openai:URL#MODEL)");
    };
    let dtype = icedit_flux::parse_dtype(&args.dtype)?;
    let load = |path: &PathBuf| {
        load_rgb(path)
            .map(|loaded| loaded.rgb)
            .with_context(|| format!("cannot read the image {}", path.display()))
    };
    let original = load(&args.original)?;
    let (first, second) = (load(&args.edits[0])?, load(&args.edits[1])?);
    let device = device(args.device)?;

    let started = Instant::now();
    let mut chain = args
        .judging
        .build(&specs, &HubOptions::from_env(), &device, dtype)?;
    let load_seconds = started.elapsed().as_secs_f64();
    // Without a usable answer this fails (naming each judge and why): this command exists to
    // try a judge setup, where keeping the first edit would hide the failure.
    let verdict = chain.compare_strict(&Comparison {
        instruction: &args.instruction,
        first: &first,
        second: &second,
        original: &original,
    })?;
    for warning in &verdict.warnings {
        eprintln!("warning: {warning}");
    }
    let winner = match verdict.preference {
        Preference::First => 1,
        Preference::Second => 2,
    };
    if args.json {
        let summary = serde_json::json!({
            "better": winner,
            "better_image": args.edits[winner - 1].display().to_string(),
            "judge": verdict.judge,
            "answer": verdict.answer,
            "load_seconds": load_seconds,
            "compare_seconds": verdict.latency.as_secs_f64(),
            "warnings": verdict.warnings,
        });
        println!("{summary:#}");
    } else {
        println!(
            "image {winner} ({}) is better, says {}: {} [{:.2} s to load, {:.2} s to compare]",
            args.edits[winner - 1].display(),
            verdict.judge,
            verdict.answer,
            load_seconds,
            verdict.latency.as_secs_f64()
        );
    }
    Ok(())
}
