//! Jobs: a bounded queue in front of the engine's thread, each job's state and results, and
//! its events for subscribers (server-sent events, waiting requests).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::broadcast;

use crate::engine::{EditResult, Engine, EngineError, EngineEvent, PreparedEdit};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(self, Self::Done | Self::Failed | Self::Cancelled)
    }

    pub const ALL: [JobState; 5] = [
        Self::Queued,
        Self::Running,
        Self::Done,
        Self::Failed,
        Self::Cancelled,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// What a job's subscribers hear, in order.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JobEvent {
    Queued,
    Started,
    Step {
        /// The seed being denoised (its index in the job's seeds).
        index: usize,
        seed: u64,
        step: usize,
        total: usize,
    },
    Done,
    Failed {
        error: String,
    },
    Cancelled,
}

/// A job's mutable part.
#[derive(Debug, Clone)]
pub struct JobStatus {
    pub state: JobState,
    /// The last step event, for a late reader.
    pub progress: Option<JobEvent>,
    pub results: Vec<EditResult>,
    pub error: Option<String>,
}

pub struct Job {
    pub id: String,
    pub edit: PreparedEdit,
    pub created: Instant,
    pub deadline: Option<Instant>,
    cancel: AtomicBool,
    status: Mutex<JobStatus>,
    events: broadcast::Sender<JobEvent>,
}

impl Job {
    pub fn status(&self) -> JobStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The current status and a subscription to what comes after it, taken together so that
    /// no event falls between them.
    pub fn subscribe(&self) -> (JobStatus, broadcast::Receiver<JobEvent>) {
        let status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        (status.clone(), self.events.subscribe())
    }

    fn update(&self, event: JobEvent, change: impl FnOnce(&mut JobStatus)) {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        change(&mut status);
        if matches!(event, JobEvent::Step { .. }) {
            status.progress = Some(event.clone());
        }
        // No subscriber is fine.
        let _ = self.events.send(event);
    }

    /// Asks a queued or running job to stop; false when it has already finished.
    pub fn cancel(&self) -> bool {
        let status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        if status.state.is_final() {
            return false;
        }
        self.cancel.store(true, Ordering::SeqCst);
        true
    }
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct Counters {
    pub steps: AtomicU64,
    /// Microseconds spent in denoising steps.
    pub step_micros: AtomicU64,
    pub rejected_full: AtomicU64,
}

/// The jobs of this server and the queue to its engine.
pub struct Jobs {
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    /// Finished jobs, oldest first, so that the oldest are forgotten past [`KEPT_FINISHED`].
    finished: Mutex<VecDeque<String>>,
    queue: Mutex<Option<SyncSender<Arc<Job>>>>,
    next_id: AtomicU64,
    pub counters: Counters,
    timeout: Option<Duration>,
}

/// Finished jobs kept for `GET /v1/jobs/{id}`.
pub const KEPT_FINISHED: usize = 256;

/// Why a job was not queued.
#[derive(Debug)]
pub enum SubmitError {
    Full,
    ShuttingDown,
}

impl Jobs {
    /// Starts the engine's thread with a queue of `capacity` jobs waiting beside the running
    /// one. The thread ends when the queue is closed ([`Jobs::close`]) and empty.
    pub fn start(
        engine: Engine,
        capacity: usize,
        timeout: Option<Duration>,
    ) -> (Arc<Self>, std::thread::JoinHandle<()>) {
        let (sender, receiver) = sync_channel::<Arc<Job>>(capacity);
        let jobs = Arc::new(Self {
            jobs: Mutex::new(HashMap::new()),
            finished: Mutex::new(VecDeque::new()),
            queue: Mutex::new(Some(sender)),
            next_id: AtomicU64::new(1),
            counters: Counters::default(),
            timeout,
        });
        let worker = Arc::clone(&jobs);
        let handle = std::thread::Builder::new()
            .name("icedit-engine".into())
            .spawn(move || {
                let mut engine = engine;
                while let Ok(job) = receiver.recv() {
                    worker.run(&mut engine, &job);
                }
            })
            .expect("spawn the engine thread");
        (jobs, handle)
    }

    /// Queues a prepared edit; refused when the queue is full or the server is stopping.
    pub fn submit(&self, edit: PreparedEdit) -> Result<Arc<Job>, SubmitError> {
        let id = format!(
            "job-{:06}-{:08x}",
            self.next_id.fetch_add(1, Ordering::SeqCst),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        );
        let (events, _) = broadcast::channel(256);
        let created = Instant::now();
        let job = Arc::new(Job {
            id: id.clone(),
            edit,
            created,
            deadline: self.timeout.map(|t| created + t),
            cancel: AtomicBool::new(false),
            status: Mutex::new(JobStatus {
                state: JobState::Queued,
                progress: None,
                results: Vec::new(),
                error: None,
            }),
            events,
        });
        let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let Some(sender) = queue.as_ref() else {
            return Err(SubmitError::ShuttingDown);
        };
        // Registered first: the engine may start it before try_send returns.
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), Arc::clone(&job));
        match sender.try_send(Arc::clone(&job)) {
            Ok(()) => Ok(job),
            Err(err) => {
                self.jobs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                Err(match err {
                    TrySendError::Full(_) => {
                        self.counters.rejected_full.fetch_add(1, Ordering::Relaxed);
                        SubmitError::Full
                    }
                    TrySendError::Disconnected(_) => SubmitError::ShuttingDown,
                })
            }
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// Jobs by state, and how many wait in the queue.
    pub fn counts(&self) -> HashMap<JobState, usize> {
        let mut counts = HashMap::new();
        for job in self.jobs.lock().unwrap_or_else(|e| e.into_inner()).values() {
            *counts.entry(job.status().state).or_insert(0) += 1;
        }
        counts
    }

    /// Stops taking jobs; the engine finishes those already queued, then its thread ends.
    pub fn close(&self) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    fn run(&self, engine: &mut Engine, job: &Job) {
        if job.cancel.load(Ordering::SeqCst) {
            return self.finish(job, JobEvent::Cancelled, |s| s.state = JobState::Cancelled);
        }
        job.update(JobEvent::Started, |s| s.state = JobState::Running);
        let mut last_step = Instant::now();
        let stop = || {
            if job.cancel.load(Ordering::SeqCst) {
                Some("cancelled")
            } else if job.deadline.is_some_and(|d| Instant::now() >= d) {
                Some("the request's time limit passed")
            } else {
                None
            }
        };
        let result = engine.run(
            &job.edit,
            &mut |event| {
                let EngineEvent::Step {
                    index,
                    seed,
                    step,
                    total,
                } = event;
                let now = Instant::now();
                self.counters.steps.fetch_add(1, Ordering::Relaxed);
                self.counters.step_micros.fetch_add(
                    now.duration_since(last_step).as_micros() as u64,
                    Ordering::Relaxed,
                );
                last_step = now;
                job.update(
                    JobEvent::Step {
                        index,
                        seed,
                        step,
                        total,
                    },
                    |_| {},
                );
            },
            &stop,
        );
        match result {
            Ok(results) => self.finish(job, JobEvent::Done, |s| {
                s.state = JobState::Done;
                s.results = results;
            }),
            Err(EngineError::Stopped("cancelled")) => {
                self.finish(job, JobEvent::Cancelled, |s| s.state = JobState::Cancelled)
            }
            Err(err) => {
                let error = err.to_string();
                self.finish(
                    job,
                    JobEvent::Failed {
                        error: error.clone(),
                    },
                    |s| {
                        s.state = JobState::Failed;
                        s.error = Some(error);
                    },
                )
            }
        }
    }

    fn finish(&self, job: &Job, event: JobEvent, change: impl FnOnce(&mut JobStatus)) {
        job.update(event, change);
        let mut finished = self.finished.lock().unwrap_or_else(|e| e.into_inner());
        finished.push_back(job.id.clone());
        while finished.len() > KEPT_FINISHED {
            if let Some(old) = finished.pop_front() {
                self.jobs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&old);
            }
        }
    }
}
