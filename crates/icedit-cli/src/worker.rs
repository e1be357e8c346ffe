//! `icedit worker`: loads the model once and runs jobs from a Redis queue that `icedit serve
//! --queue` (or `icedit batch --queue`) fills; many workers on many GPU machines share one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use icedit_server::{Outcome, RedisQueue, Worker, WorkerConfig};

use crate::adapters::AdapterArgs;
use crate::judge::JudgeArgs;
use crate::progress::Reporter;
use crate::serve::{EngineSetup, QUEUE_PREFIX};
use crate::{device_name, ModelArgs};

#[derive(clap::Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    adapters: AdapterArgs,
    /// The judge of jobs that ask for a best-of-N search.
    #[command(flatten)]
    judging: JudgeArgs,
    /// The Redis queue to take jobs from: `redis://HOST:PORT[/DB]`, or `redis+unix:///PATH` for a Unix socket.
    #[arg(long, value_name = "URL")]
    queue: String,
    /// This worker's name in the consumer group (default: host name and process id); unique
    /// per worker.
    #[arg(long)]
    name: Option<String>,
    /// Seconds a job may go without a sign of life from its worker (sent every third of it
    /// while the job runs) before another worker takes it over.
    #[arg(long, default_value_t = 300)]
    visibility_timeout: u64,
    /// Tries before a failing job goes to the dead-letter stream `icedit:dead`.
    #[arg(long, default_value_t = 3)]
    max_attempts: u32,
    /// Seconds results and events are kept in Redis.
    #[arg(long, default_value_t = 7 * 24 * 3600)]
    result_ttl: u64,
    /// No progress output.
    #[arg(long)]
    quiet: bool,
}

pub fn run(args: WorkerArgs) -> Result<()> {
    let reporter = Reporter::new(args.quiet);
    if args.visibility_timeout == 0 || args.max_attempts == 0 || args.result_ttl == 0 {
        bail!("--visibility-timeout, --max-attempts and --result-ttl must be above 0");
    }
    const DAY: u64 = 24 * 3600;
    if args.visibility_timeout > DAY || args.max_attempts > 100 || args.result_ttl > 365 * DAY {
        bail!(
            "--visibility-timeout is at most a day ({DAY} s), --max-attempts 100 and \
             --result-ttl a year"
        );
    }
    let name = match args.name.clone() {
        Some(name) if name.trim().is_empty() => bail!("--name must not be empty"),
        Some(name) => name,
        None => format!("{}-{}", host_name(), std::process::id()),
    };
    // Reached before the model loads, so a wrong address fails in seconds.
    let queue = RedisQueue::open(&args.queue, QUEUE_PREFIX)?;
    let setup = EngineSetup::open(&args.model, &args.adapters, &args.judging, &reporter, true)?;
    let mut engine = setup.engine.expect("loaded");
    let stop = Arc::new(AtomicBool::new(false));
    watch_signals(Arc::clone(&stop));
    eprintln!(
        "icedit worker {name}: {} ({}) on {}, taking jobs from {}",
        setup.model_name,
        setup.kind.name(),
        device_name(&setup.device),
        args.queue
    );
    let worker = Worker {
        queue: &queue,
        config: WorkerConfig {
            name: name.clone(),
            visibility_timeout: Duration::from_secs(args.visibility_timeout),
            max_attempts: args.max_attempts,
            result_ttl: Duration::from_secs(args.result_ttl),
        },
    };
    worker.run(&mut engine, &stop, &mut |outcome| {
        let line = match outcome {
            Outcome::Done { id, seconds } => format!("{id}: done in {seconds:.1} s"),
            Outcome::AlreadyDone { id } => format!("{id}: already done elsewhere"),
            Outcome::Cancelled { id } => format!("{id}: cancelled"),
            Outcome::Failed { id, error } => format!("{id}: failed: {error}"),
            Outcome::Retry { id, attempt, error } => {
                format!("{id}: try {attempt} failed, to be retried: {error}")
            }
            Outcome::Dead { id, error } => format!("{id}: to the dead-letter stream: {error}"),
        };
        reporter.note(&line);
    });
    reporter.note(&format!("worker {name} stopped"));
    Ok(())
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into())
}

/// Ctrl-C or SIGTERM: finish the job in hand, then stop.
fn watch_signals(stop: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(crate::serve::shutdown_signal());
        eprintln!("icedit worker: stopping after the job in hand");
        stop.store(true, Ordering::SeqCst);
    });
}
