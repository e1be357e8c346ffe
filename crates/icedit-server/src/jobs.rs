//! Jobs: a bounded queue in front of the engine's thread, each job's state and results, and
//! its events for subscribers (server-sent events, waiting requests).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{
    channel, sync_channel, Receiver, RecvTimeoutError, Sender, SyncSender, TrySendError,
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::engine::{EditResult, Engine, EngineError, EngineEvent, PreparedEdit};
use crate::queue::{QueueError, RedisQueue};

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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// A search computed its `evaluations`-th denoising step.
    SearchStep {
        evaluations: usize,
    },
    Done,
    Failed {
        error: String,
    },
    Cancelled,
}

impl JobEvent {
    /// What a job's subscribers hear of the engine's event (steps; not its progress bar).
    pub fn of_engine(event: EngineEvent) -> Option<Self> {
        match event {
            EngineEvent::Step {
                index,
                seed,
                step,
                total,
            } => Some(Self::Step {
                index,
                seed,
                step,
                total,
            }),
            EngineEvent::SearchStep { evaluations } => Some(Self::SearchStep { evaluations }),
            EngineEvent::Progress(_) | EngineEvent::Warning(_) => None,
        }
    }
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
    /// `None` for a job this server found in the queue (submitted elsewhere or before a
    /// restart): it only follows it.
    pub edit: Option<PreparedEdit>,
    /// The seeds asked for (unknown, so empty, for a job found in the queue).
    pub seeds: Vec<u64>,
    pub created: Instant,
    pub deadline: Option<Instant>,
    cancel: AtomicBool,
    status: Mutex<JobStatus>,
    events: broadcast::Sender<JobEvent>,
}

impl Job {
    /// A job in the queued state, its time limit (if any) counted from now.
    fn queued(
        id: String,
        edit: Option<PreparedEdit>,
        seeds: Vec<u64>,
        timeout: Option<Duration>,
    ) -> Self {
        let created = Instant::now();
        Self {
            id,
            edit,
            seeds,
            created,
            deadline: timeout.map(|t| created + t),
            cancel: AtomicBool::new(false),
            status: Mutex::new(JobStatus {
                state: JobState::Queued,
                progress: None,
                results: Vec::new(),
                error: None,
            }),
            events: broadcast::channel(256).0,
        }
    }

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
        if matches!(event, JobEvent::Step { .. } | JobEvent::SearchStep { .. }) {
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
    queue: Mutex<Option<Backend>>,
    next_id: AtomicU64,
    pub counters: Counters,
    timeout: Option<Duration>,
}

/// Finished jobs kept for `GET /v1/jobs/{id}`.
pub const KEPT_FINISHED: usize = 256;

/// Where jobs go: this server's engine thread, or a Redis queue that workers consume (the
/// forwarding thread then relays their events and results to the job).
enum Backend {
    Engine(SyncSender<Arc<Job>>),
    Redis {
        queue: Arc<RedisQueue>,
        capacity: usize,
        forward: Sender<Arc<Job>>,
    },
}

/// Why a job was not queued.
#[derive(Debug)]
pub enum SubmitError {
    Full,
    ShuttingDown,
    /// The queue's Redis failed.
    Queue(String),
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
        let jobs = Self::new(Backend::Engine(sender), timeout);
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

    /// Jobs sent to a Redis queue, at most `capacity` waiting or running there. The returned
    /// thread relays workers' events and results; it ends once closed and every job it
    /// follows has finished.
    pub fn start_queue(
        queue: Arc<RedisQueue>,
        capacity: usize,
        timeout: Option<Duration>,
    ) -> (Arc<Self>, std::thread::JoinHandle<()>) {
        let (forward, followed) = channel::<Arc<Job>>();
        let jobs = Self::new(
            Backend::Redis {
                queue: Arc::clone(&queue),
                capacity,
                forward,
            },
            timeout,
        );
        let relay = Arc::clone(&jobs);
        let handle = std::thread::Builder::new()
            .name("icedit-queue".into())
            .spawn(move || relay.relay(&queue, followed))
            .expect("spawn the queue's thread");
        (jobs, handle)
    }

    fn new(backend: Backend, timeout: Option<Duration>) -> Arc<Self> {
        Arc::new(Self {
            jobs: Mutex::new(HashMap::new()),
            finished: Mutex::new(VecDeque::new()),
            queue: Mutex::new(Some(backend)),
            next_id: AtomicU64::new(1),
            counters: Counters::default(),
            timeout,
        })
    }

    /// Queues a prepared edit; refused when the queue is full or the server is stopping.
    pub fn submit(&self, edit: PreparedEdit) -> Result<Arc<Job>, SubmitError> {
        // Unique across servers sharing a queue: the process and the time go in too.
        let id = format!(
            "job-{:06}-{:x}-{:08x}",
            self.next_id.fetch_add(1, Ordering::SeqCst),
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        );
        let seeds = edit.request.seeds.clone();
        let job = Arc::new(Job::queued(id.clone(), Some(edit), seeds, self.timeout));
        let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let Some(backend) = queue.as_ref() else {
            return Err(SubmitError::ShuttingDown);
        };
        // Registered first: the engine may start it before the send returns.
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), Arc::clone(&job));
        let sent = match backend {
            Backend::Engine(sender) => sender.try_send(Arc::clone(&job)).map_err(|err| match err {
                TrySendError::Full(_) => SubmitError::Full,
                TrySendError::Disconnected(_) => SubmitError::ShuttingDown,
            }),
            Backend::Redis {
                queue,
                capacity,
                forward,
            } => {
                let deadline = self.timeout.map(|t| SystemTime::now() + t);
                let request = &job.edit.as_ref().expect("a submitted job's edit").request;
                match queue.submit(&id, request, deadline, *capacity) {
                    Ok(()) => forward
                        .send(Arc::clone(&job))
                        .map_err(|_| SubmitError::ShuttingDown),
                    Err(QueueError::Full(_)) => Err(SubmitError::Full),
                    Err(e) => Err(SubmitError::Queue(e.to_string())),
                }
            }
        };
        match sent {
            Ok(()) => Ok(job),
            Err(err) => {
                self.jobs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                if matches!(err, SubmitError::Full) {
                    self.counters.rejected_full.fetch_add(1, Ordering::Relaxed);
                }
                Err(err)
            }
        }
    }

    /// A job this server does not know but its Redis queue does (submitted by another server,
    /// or before this one restarted): its stored result or end, or followed from now on like
    /// the server's own. `Ok(None)` without a queue or where the queue has no such job.
    pub fn adopt(&self, id: &str) -> Result<Option<Arc<Job>>, QueueError> {
        let (queue, forward) = match self
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            Some(Backend::Redis { queue, forward, .. }) => (Arc::clone(queue), forward.clone()),
            _ => return Ok(None),
        };
        if id.len() > 200 {
            return Ok(None);
        }
        let fields = queue.job_fields(id)?;
        let results = queue.result(id)?;
        if fields.is_empty() && results.is_none() {
            return Ok(None);
        }
        let seeds = results.iter().flatten().map(|r| r.seed).collect();
        let job = Arc::new(Job::queued(id.to_string(), None, seeds, None));
        {
            // Two requests may adopt the same job at once: the first one's stays.
            let mut known = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(existing) = known.get(id) {
                return Ok(Some(Arc::clone(existing)));
            }
            known.insert(id.to_string(), Arc::clone(&job));
        }
        let state = fields.get("state").map(String::as_str);
        match (results, state) {
            (Some(results), _) => self.finish(&job, JobEvent::Done, |s| {
                s.state = JobState::Done;
                s.results = results;
            }),
            (None, Some("cancelled")) => {
                self.finish(&job, JobEvent::Cancelled, |s| s.state = JobState::Cancelled)
            }
            (None, Some("dead" | "failed")) => {
                let error = fields.get("error").cloned().unwrap_or_default();
                self.fail(&job, error)
            }
            // Waiting or running: its events, from the first, come through the relay.
            _ => {
                if forward.send(Arc::clone(&job)).is_err() {
                    self.fail(&job, "the server is shutting down".into());
                }
            }
        }
        Ok(Some(job))
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

    /// Jobs waiting or running in the Redis queue (all servers' and batches'), when jobs go to
    /// one; a network round trip.
    pub fn shared_queue_depth(&self) -> Option<Result<usize, QueueError>> {
        match self
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            Some(Backend::Redis { queue, .. }) => Some(queue.depth()),
            _ => None,
        }
    }

    /// Stops taking jobs; the engine finishes those already queued (a queue's relay, those it
    /// follows), then its thread ends.
    pub fn close(&self) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    fn run(&self, engine: &mut Engine, job: &Job) {
        let Some(edit) = &job.edit else {
            return self.fail(job, "the job has no edit to run".into());
        };
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
            edit,
            &mut |event| {
                let Some(event) = JobEvent::of_engine(event) else {
                    return;
                };
                let now = Instant::now();
                self.counters.steps.fetch_add(1, Ordering::Relaxed);
                self.counters.step_micros.fetch_add(
                    now.duration_since(last_step).as_micros() as u64,
                    Ordering::Relaxed,
                );
                last_step = now;
                job.update(event, |_| {});
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
            Err(err) => self.fail(job, err.to_string()),
        }
    }

    /// Follows the jobs sent to the queue: their events, read from Redis, become the jobs'
    /// events; a done job's results are fetched; a cancel is passed on to the workers.
    fn relay(&self, queue: &RedisQueue, new_jobs: Receiver<Arc<Job>>) {
        struct Followed {
            job: Arc<Job>,
            cursor: String,
            cancel_sent: bool,
        }
        let mut followed: Vec<Followed> = Vec::new();
        let mut con = None;
        let mut closed = false;
        let mut last_step = Instant::now();
        loop {
            // New jobs; when there is nothing to follow, wait for one.
            loop {
                let next = if followed.is_empty() && !closed {
                    new_jobs.recv_timeout(Duration::from_secs(1))
                } else {
                    new_jobs.try_recv().map_err(|e| match e {
                        std::sync::mpsc::TryRecvError::Empty => RecvTimeoutError::Timeout,
                        std::sync::mpsc::TryRecvError::Disconnected => {
                            RecvTimeoutError::Disconnected
                        }
                    })
                };
                match next {
                    Ok(job) => followed.push(Followed {
                        job,
                        cursor: "0".into(),
                        cancel_sent: false,
                    }),
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
            if followed.is_empty() {
                if closed {
                    return;
                }
                continue;
            }
            let connection = match con.as_mut() {
                Some(c) => c,
                None => match queue.connection() {
                    Ok(c) => con.insert(c),
                    Err(e) => {
                        eprintln!("icedit serve: the queue's Redis is unreachable ({e})");
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                },
            };
            for f in followed.iter_mut() {
                if !f.cancel_sent && f.job.cancel.load(Ordering::SeqCst) {
                    f.cancel_sent = queue.cancel(&f.job.id).is_ok();
                }
            }
            let cursors: Vec<(String, String)> = followed
                .iter()
                .map(|f| (f.job.id.clone(), f.cursor.clone()))
                .collect();
            let events = match queue.read_events(connection, &cursors, Duration::from_millis(500)) {
                Ok(events) => events,
                Err(e) => {
                    eprintln!("icedit serve: reading the queue's events failed ({e})");
                    con = None;
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            };
            for (id, cursor, event) in events {
                let Some(f) = followed.iter_mut().find(|f| f.job.id == id) else {
                    continue;
                };
                f.cursor = cursor;
                let job = &f.job;
                match event {
                    // Already the job's first event here.
                    JobEvent::Queued => {}
                    JobEvent::Started => {
                        job.update(JobEvent::Started, |s| s.state = JobState::Running)
                    }
                    step @ (JobEvent::Step { .. } | JobEvent::SearchStep { .. }) => {
                        let now = Instant::now();
                        self.counters.steps.fetch_add(1, Ordering::Relaxed);
                        self.counters.step_micros.fetch_add(
                            now.duration_since(last_step).as_micros() as u64,
                            Ordering::Relaxed,
                        );
                        last_step = now;
                        job.update(step, |_| {})
                    }
                    JobEvent::Done => match queue.result(&id) {
                        Ok(Some(results)) => self.finish(job, JobEvent::Done, |s| {
                            s.state = JobState::Done;
                            s.results = results;
                        }),
                        Ok(None) | Err(_) => self.fail(
                            job,
                            "a worker finished the job but its result cannot be read".into(),
                        ),
                    },
                    JobEvent::Failed { error } => self.fail(job, error),
                    JobEvent::Cancelled => {
                        self.finish(job, JobEvent::Cancelled, |s| s.state = JobState::Cancelled)
                    }
                }
            }
            // A job no worker finished long after its deadline is given up here (it stays
            // in the queue, cancelled, for a worker to drop).
            for f in &followed {
                if f.job
                    .deadline
                    .is_some_and(|d| Instant::now() > d + Duration::from_secs(60))
                    && !f.job.status().state.is_final()
                {
                    let _ = queue.cancel(&f.job.id);
                    self.fail(
                        &f.job,
                        "no worker finished the job within the request's time limit".into(),
                    );
                }
            }
            followed.retain(|f| !f.job.status().state.is_final());
        }
    }

    fn fail(&self, job: &Job, error: String) {
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
