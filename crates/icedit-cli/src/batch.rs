//! `icedit batch JOBS.jsonl --out DIR`: a file of edits, run here with one model load (or
//! submitted to a Redis queue and collected), resuming where a stopped run left off.
//!
//! Each line is one job:
//! `{"id": "cat", "image": "cat.jpg", "instruction": "make it night", "seed": 7}`, with
//! optionally `mask`, `n` (images from `seed` on), `seeds` (listed instead), `steps`,
//! `guidance`, `width`, `height`, `negative_prompt`, `true_cfg_scale`, `search`, `adapters`: the
//! fields and checks of the server's job API (`RequestSettings`); paths are relative to the
//! file's folder. A job's images are written as
//! `DIR/{id}-{seed}.png` (their recipes inside), then `DIR/{id}.json`, which marks it done: a
//! rerun skips every job whose summary and images are there.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use icedit_hub::HubOptions;
use icedit_pipeline::edit::JobOptions;
use icedit_pipeline::image_io::{load_mask, load_rgb, write_file_atomically};
use icedit_server::engine::{EditRequest, EditResult, Engine, EngineEvent};
use icedit_server::settings::{read_with_settings, CheckedSettings};
use icedit_server::RedisQueue;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::adapters::AdapterArgs;
use crate::inputs::{add_model_inputs, check_png_name};
use crate::judge::JudgeArgs;
use crate::outputs::{Inputs, Outputs};
use crate::progress::Reporter;
use crate::serve::{EngineSetup, QUEUE_PREFIX};
use crate::ModelArgs;

#[derive(clap::Args)]
pub struct BatchArgs {
    /// The jobs: a JSON Lines file, one edit a line, e.g. `{"id": "cat", "image": "cat.jpg",
    /// "instruction": "make it night", "seed": 7}`; also `mask`, `n`, `seeds`, `steps`, `guidance`,
    /// `width`, `height`, `negative_prompt` with `true_cfg_scale`, `search`
    /// (`{"early_steps": 10}`, with --judge) and `adapters`. Paths are relative to the file;
    /// `id` (default `line-N`) names the outputs.
    #[arg(value_name = "JOBS.jsonl")]
    jobs: PathBuf,
    /// The folder the images and each job's summary go to (created when missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    adapters: AdapterArgs,
    /// The judge of jobs with a `search` (best of their seeds).
    #[command(flatten)]
    judging: JudgeArgs,
    /// Submit the jobs to this Redis queue (`redis://HOST:PORT[/DB]`, or `redis+unix:///PATH` for a Unix socket) and collect what the
    /// workers make, instead of running them here. The model flags then only validate.
    #[arg(long, value_name = "URL")]
    queue: Option<String>,
    /// With --queue: jobs in the queue at most (waiting or running); more wait here.
    #[arg(long, default_value_t = 64)]
    queue_size: usize,
    /// No progress output.
    #[arg(long)]
    quiet: bool,
}

/// One line of the jobs file: these fields, and the settings every entry point reads.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobLine {
    #[serde(default)]
    id: Option<String>,
    image: PathBuf,
    instruction: String,
    #[serde(default)]
    mask: Option<PathBuf>,
    #[serde(default)]
    width: Option<u32>,
    #[serde(default)]
    height: Option<u32>,
}

/// A job as read and checked, before its images are decoded.
struct BatchJob {
    id: String,
    line: usize,
    image: PathBuf,
    mask: Option<PathBuf>,
    instruction: String,
    options: JobOptions,
    settings: CheckedSettings,
}

/// `DIR/{id}.json`: written after the job's images, so its presence means the job is done.
#[derive(Debug, Serialize, Deserialize)]
struct Summary {
    id: String,
    instruction: String,
    images: Vec<SummaryImage>,
    seconds: f64,
}

#[derive(Debug, Serialize, Deserialize)]
struct SummaryImage {
    seed: u64,
    file: String,
    recipe: icedit_pipeline::recipe::Recipe,
    /// A search's candidates and verdicts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    search: Option<icedit_server::engine::SearchSummary>,
}

impl BatchJob {
    fn image_name(&self, seed: u64) -> String {
        format!("{}-{seed}.png", self.id)
    }

    /// A search keeps its winner only.
    fn image_count(&self) -> usize {
        if self.settings.search.is_some() {
            1
        } else {
            self.settings.seeds.len()
        }
    }

    fn summary_name(&self) -> String {
        format!("{}.json", self.id)
    }

    /// Done in an earlier run: its summary and every image are there.
    fn is_done(&self, out: &Path) -> bool {
        let Ok(text) = std::fs::read_to_string(out.join(self.summary_name())) else {
            return false;
        };
        serde_json::from_str::<Summary>(&text).is_ok_and(|s| {
            s.images.len() == self.image_count()
                && s.images.iter().all(|i| out.join(&i.file).is_file())
        })
    }

    /// The request, images decoded.
    fn request(&self) -> Result<EditRequest> {
        let photo = load_rgb(&self.image)?.rgb;
        let mask = self.mask.as_deref().map(load_mask).transpose()?;
        Ok(self.settings.clone().into_request(
            photo,
            mask,
            self.instruction.clone(),
            self.options.clone(),
        ))
    }

    /// Writes the images, then the summary.
    fn write(&self, out: &Path, results: &[EditResult], seconds: f64) -> Result<()> {
        let mut images = Vec::new();
        for result in results {
            let file = self.image_name(result.seed);
            write_file_atomically(&out.join(&file), &result.png)?;
            images.push(SummaryImage {
                seed: result.seed,
                file,
                recipe: result.recipe.clone(),
                search: result.search.clone(),
            });
        }
        let summary = Summary {
            id: self.id.clone(),
            instruction: self.instruction.clone(),
            images,
            seconds,
        };
        write_file_atomically(
            &out.join(self.summary_name()),
            serde_json::to_string_pretty(&summary)?.as_bytes(),
        )?;
        Ok(())
    }
}

/// A job id names files: letters, digits, `-`, `_` and `.`, not starting with a dot.
fn check_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 100
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn read_jobs(path: &Path) -> Result<Vec<BatchJob>> {
    let text = icedit_flux::files::read_text_file(path, 64 << 20)
        .with_context(|| format!("cannot read the jobs file {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut jobs = Vec::new();
    let mut ids = HashSet::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let raw = raw.trim();
        if raw.is_empty() || raw.starts_with('#') {
            continue;
        }
        let at = || format!("{} line {line}", path.display());
        let object = serde_json::from_str(raw).with_context(|| {
            format!(
                "{}: not a job ({{\"image\": ..., \"instruction\": ...}} as JSON)",
                at()
            )
        })?;
        let (job, settings) =
            read_with_settings::<JobLine>(object).map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
        let id = job.id.unwrap_or_else(|| format!("line-{line}"));
        if !check_id(&id) {
            bail!(
                "{}: id {id:?} names files: use letters, digits, '-', '_' and '.'",
                at()
            );
        }
        if !ids.insert(id.clone()) {
            bail!("{}: id {id:?} is used by an earlier line", at());
        }
        if job.instruction.trim().is_empty() {
            bail!("{}: the instruction is empty", at());
        }
        // Seed 0 when none is named, so that a rerun of the file makes the same images.
        let settings = settings
            .check(|| 0)
            .map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
        let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let image = resolve(job.image);
        if !image.is_file() {
            bail!("{}: no image at {}", at(), image.display());
        }
        let mask = job.mask.map(resolve);
        if let Some(mask) = mask.as_ref().filter(|m| !m.is_file()) {
            bail!("{}: no mask at {}", at(), mask.display());
        }
        jobs.push(BatchJob {
            id,
            line,
            image,
            mask,
            instruction: job.instruction,
            options: JobOptions {
                width: job.width,
                height: job.height,
                ..JobOptions::default()
            },
            settings,
        });
    }
    if jobs.is_empty() {
        bail!("{}: no jobs in the file", path.display());
    }
    Ok(jobs)
}

pub fn run(args: BatchArgs) -> Result<()> {
    let reporter = Reporter::new(args.quiet);
    if args.queue_size == 0 {
        bail!("--queue-size must be above 0");
    }
    let jobs = read_jobs(&args.jobs)?;

    // Nothing an output would replace: the inputs, each other, the model's folders.
    let hub = HubOptions::from_env();
    let mut inputs = Inputs::default();
    inputs.file("jobs file", &args.jobs);
    for job in &jobs {
        inputs.file(&format!("image of job {}", job.id), &job.image);
        if let Some(mask) = &job.mask {
            inputs.file(&format!("mask of job {}", job.id), mask);
        }
    }
    add_model_inputs(&mut inputs, &args.model, &hub)?;
    let mut planned = Outputs::default();
    // The folder: not in a model folder or the cache, writable (created below when missing).
    // Its files, when it exists: none of them an input.
    planned.folder("--out", &args.out, |_| false);
    let exists = args.out.is_dir();
    for job in jobs.iter().filter(|_| exists) {
        for &seed in &job.settings.seeds {
            let path = args.out.join(job.image_name(seed));
            check_png_name(&path)?;
            planned.file(&format!("image {}", job.image_name(seed)), &path);
        }
        planned.file(
            &format!("summary {}", job.summary_name()),
            &args.out.join(job.summary_name()),
        );
    }
    planned.check(&inputs)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create --out {}", args.out.display()))?;

    let todo: Vec<&BatchJob> = jobs.iter().filter(|j| !j.is_done(&args.out)).collect();
    if todo.len() < jobs.len() {
        reporter.note(&format!(
            "{} of {} jobs already done in {}; running the other {}",
            jobs.len() - todo.len(),
            jobs.len(),
            args.out.display(),
            todo.len()
        ));
    }
    if todo.is_empty() {
        reporter.done("nothing left to do");
        return Ok(());
    }
    // Every job's request is checked against the model before any runs or is submitted.
    let setup = EngineSetup::open(
        &args.model,
        &args.adapters,
        &args.judging,
        &reporter,
        args.queue.is_none(),
    )?;
    for job in &todo {
        job.request()?
            .prepare(setup.kind, &setup.config)
            .with_context(|| {
                format!("{} line {} (job {})", args.jobs.display(), job.line, job.id)
            })?;
    }
    let bar = job_bar(todo.len(), args.quiet);
    let failed = match (&args.queue, setup.engine) {
        (Some(url), _) => {
            let queue = RedisQueue::open(url, QUEUE_PREFIX)?;
            run_on_queue(&queue, &todo, &args, &bar)?
        }
        (None, Some(mut engine)) => run_here(&mut engine, &setup.config, &todo, &args.out, &bar)?,
        (None, None) => unreachable!("the engine is loaded without --queue"),
    };
    bar.finish_and_clear();
    if !failed.is_empty() {
        for (id, error) in &failed {
            reporter.warn(&format!("job {id} failed: {error}"));
        }
        bail!(
            "{} of {} jobs failed (above); run the same command again to retry them",
            failed.len(),
            todo.len()
        );
    }
    reporter.done(&format!(
        "{} jobs done; images and summaries in {}",
        todo.len(),
        args.out.display()
    ));
    Ok(())
}

fn job_bar(jobs: usize, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(jobs as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "batch [{bar:30}] {pos}/{len} jobs, {elapsed} elapsed, ~{eta} left {msg}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(250));
    bar
}

/// Runs the jobs on this machine, one after another; a failed job is reported, not fatal.
fn run_here(
    engine: &mut Engine,
    config: &icedit_server::EngineConfig,
    jobs: &[&BatchJob],
    out: &Path,
    bar: &ProgressBar,
) -> Result<Vec<(String, String)>> {
    let mut failed = Vec::new();
    for job in jobs {
        let started = Instant::now();
        let mut run = || -> Result<()> {
            let edit = job.request()?.prepare(engine.kind(), config)?;
            let results = engine.run(
                &edit,
                &mut |event| {
                    bar.set_message(match event {
                        EngineEvent::Step {
                            index, step, total, ..
                        } => format!(
                            "({}: image {}/{}, step {step}/{total})",
                            job.id,
                            index + 1,
                            job.settings.seeds.len()
                        ),
                        EngineEvent::SearchStep { evaluations } => {
                            format!("({}: search, {evaluations} steps)", job.id)
                        }
                        EngineEvent::Warning(warning) => {
                            bar.println(format!("warning: job {}: {warning}", job.id));
                            return;
                        }
                        EngineEvent::Progress(_) => return,
                    })
                },
                &|| None,
            )?;
            job.write(out, &results, started.elapsed().as_secs_f64())
        };
        if let Err(e) = run() {
            failed.push((job.id.clone(), format!("{e:#}")));
        }
        bar.inc(1);
    }
    Ok(failed)
}

/// The queue's id of a job: its own id and a digest of the whole request, so that a rerun of
/// the same line finds its earlier result and a changed line is a new job.
fn queue_id(job: &BatchJob, request: &EditRequest) -> Result<String> {
    let digest = sha2::Sha256::digest(serde_json::to_vec(request)?);
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("batch-{}-{hex}", job.id))
}

/// Submits the jobs (at most `--queue-size` in the queue at once) and writes each result as it
/// arrives. A job already done or still queued from an earlier run is collected, not resent.
fn run_on_queue(
    queue: &RedisQueue,
    jobs: &[&BatchJob],
    args: &BatchArgs,
    bar: &ProgressBar,
) -> Result<Vec<(String, String)>> {
    let mut waiting: Vec<(&BatchJob, String, Instant)> = Vec::new();
    let mut next = jobs.iter();
    let mut failed = Vec::new();
    loop {
        // Fill the queue up to its size.
        while waiting.len() < args.queue_size {
            let Some(job) = next.next() else { break };
            let request = job.request()?;
            let id = queue_id(job, &request)?;
            let fields = queue.job_fields(&id)?;
            let known = queue.result(&id)?.is_some()
                || matches!(
                    fields.get("state").map(String::as_str),
                    Some("queued" | "running")
                );
            if !known {
                queue.submit(&id, &request, None, usize::MAX)?;
            }
            waiting.push((job, id, Instant::now()));
        }
        if waiting.is_empty() {
            break;
        }
        let mut still = Vec::new();
        for (job, id, since) in waiting {
            if let Some(results) = queue.result(&id)? {
                job.write(&args.out, &results, since.elapsed().as_secs_f64())
                    .with_context(|| format!("job {}", job.id))?;
                bar.inc(1);
                continue;
            }
            let fields = queue.job_fields(&id)?;
            match fields.get("state").map(String::as_str) {
                Some(state @ ("dead" | "failed" | "cancelled")) => {
                    let error = fields.get("error").cloned().unwrap_or_else(|| state.into());
                    failed.push((job.id.clone(), error));
                    bar.inc(1);
                }
                _ => still.push((job, id, since)),
            }
        }
        waiting = still;
        if !waiting.is_empty() {
            bar.set_message(format!("({} in the queue)", waiting.len()));
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(failed)
}
