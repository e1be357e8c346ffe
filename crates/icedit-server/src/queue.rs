//! Edit jobs on Redis Streams, for a server in front of workers on other machines.
//!
//! A server adds each request to one stream; workers read it in one consumer group, run the
//! edit, write its result once and acknowledge. At least once, and idempotent:
//! - a worker that dies leaves its entry pending; another takes it over with `XAUTOCLAIM` once
//!   it has been idle for the visibility timeout (a live worker renews its claim between steps);
//! - the result is written with `SET NX`, so a job that finishes twice keeps one result, and
//!   a worker that finds a result already there only acknowledges;
//! - a job tried `max_attempts` times goes to the dead-letter stream with its last error.
//!
//! Keys, under a prefix (default `icedit`):
//! - `{p}:jobs`: the stream of jobs (fields `id`, `request` as JSON, `deadline_ms`), read by
//!   the group `workers`; entries are deleted once acknowledged, so its length is the number
//!   of jobs waiting or running;
//! - `{p}:job:{id}`: a hash (`state`, `attempts`, `worker`, `error`, `cancel`);
//! - `{p}:events:{id}`: the job's events in order (field `event`, [`JobEvent`] as JSON), which
//!   the server forwards to its clients;
//! - `{p}:result:{id}`: the results as JSON ([`EditResult`]s, PNGs in base64);
//! - `{p}:dead`: the dead-letter stream (`id`, `error`, `attempts`, `request`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::{Commands, Connection, RedisResult, Value};

use crate::engine::{EditRequest, EditResult, Engine, EngineError, EngineEvent};
use crate::jobs::JobEvent;

const GROUP: &str = "workers";
/// Events kept per job (a 28-step edit of 10 seeds sends about 300).
const EVENTS_KEPT: usize = 2000;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error(
        "cannot reach Redis at {url}: {error}. Start one (`docker run -d -p 6379:6379 redis:7` \
         or `apt install redis-server`) and pass its address as --queue redis://HOST:PORT"
    )]
    Unreachable {
        url: String,
        // Not `source`: the message already says it, once.
        error: redis::RedisError,
    },
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("the queue is full ({0} jobs waiting or running)")]
    Full(usize),
    #[error("{0}")]
    Json(#[from] serde_json::Error),
}

/// A connection to the queue's Redis and the names of its keys.
pub struct RedisQueue {
    client: redis::Client,
    url: String,
    prefix: String,
    /// Idle connections, reused by the server's short requests.
    idle: Mutex<Vec<Connection>>,
}

/// Milliseconds since the Unix epoch: deadlines travel between machines as wall-clock times.
pub fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl RedisQueue {
    /// Connects (`redis://HOST:PORT[/DB]`), checks the server answers and creates the stream
    /// and its consumer group when they do not exist yet.
    pub fn open(url: &str, prefix: &str) -> Result<Self, QueueError> {
        let unreachable = |error| QueueError::Unreachable {
            url: url.to_string(),
            error,
        };
        let client = redis::Client::open(url).map_err(unreachable)?;
        let queue = Self {
            client,
            url: url.to_string(),
            prefix: prefix.to_string(),
            idle: Mutex::new(Vec::new()),
        };
        let mut con = queue.connect().map_err(unreachable)?;
        let created: RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(queue.jobs_key())
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query(&mut con);
        match created {
            Ok(()) => {}
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => return Err(unreachable(e)),
        }
        queue.put_back(con);
        Ok(queue)
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn connect(&self) -> RedisResult<Connection> {
        let con = self
            .client
            .get_connection_with_timeout(Duration::from_secs(5))?;
        // Longer than any blocking read here (at most 2 s), so a dead server is noticed.
        con.set_read_timeout(Some(Duration::from_secs(15)))?;
        con.set_write_timeout(Some(Duration::from_secs(15)))?;
        Ok(con)
    }

    /// Runs `f` on an idle connection (or a new one), keeping the connection unless it failed.
    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> RedisResult<T>) -> RedisResult<T> {
        let pooled = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut con = match pooled {
            Some(con) => con,
            None => self.connect()?,
        };
        let result = f(&mut con);
        if result.is_ok() {
            self.put_back(con);
        }
        result
    }

    fn put_back(&self, con: Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < 8 {
            idle.push(con);
        }
    }

    pub fn jobs_key(&self) -> String {
        format!("{}:jobs", self.prefix)
    }
    pub fn job_key(&self, id: &str) -> String {
        format!("{}:job:{id}", self.prefix)
    }
    pub fn events_key(&self, id: &str) -> String {
        format!("{}:events:{id}", self.prefix)
    }
    pub fn result_key(&self, id: &str) -> String {
        format!("{}:result:{id}", self.prefix)
    }
    pub fn dead_key(&self) -> String {
        format!("{}:dead", self.prefix)
    }

    /// Jobs waiting or running.
    pub fn depth(&self) -> Result<usize, QueueError> {
        Ok(self.with(|con| con.xlen(self.jobs_key()))?)
    }

    /// Adds a job, refused when `capacity` jobs already wait or run.
    pub fn submit(
        &self,
        id: &str,
        request: &EditRequest,
        deadline: Option<SystemTime>,
        capacity: usize,
    ) -> Result<(), QueueError> {
        let depth = self.depth()?;
        if depth >= capacity {
            return Err(QueueError::Full(depth));
        }
        let request = serde_json::to_string(request)?;
        let queued = serde_json::to_string(&JobEvent::Queued)?;
        let deadline = deadline.map(unix_ms).unwrap_or(0);
        self.with(|con| {
            // A job id sent again (a batch retrying a failed job) starts afresh.
            redis::pipe()
                .atomic()
                .del(self.job_key(id))
                .ignore()
                .del(self.events_key(id))
                .ignore()
                .hset(self.job_key(id), "state", "queued")
                .ignore()
                .xadd(self.events_key(id), "*", &[("event", &queued)])
                .ignore()
                .cmd("XADD")
                .arg(self.jobs_key())
                .arg("*")
                .arg("id")
                .arg(id)
                .arg("request")
                .arg(&request)
                .arg("deadline_ms")
                .arg(deadline)
                .ignore()
                .query::<()>(con)
        })?;
        Ok(())
    }

    /// Asks the worker running (or about to run) the job to stop.
    pub fn cancel(&self, id: &str) -> Result<(), QueueError> {
        Ok(self.with(|con| con.hset::<_, _, _, ()>(self.job_key(id), "cancel", 1))?)
    }

    /// The job's results, once a worker has written them.
    pub fn result(&self, id: &str) -> Result<Option<Vec<EditResult>>, QueueError> {
        let text: Option<String> = self.with(|con| con.get(self.result_key(id)))?;
        Ok(text.map(|t| serde_json::from_str(&t)).transpose()?)
    }

    /// The job's state and error as its hash holds them.
    pub fn job_fields(&self, id: &str) -> Result<HashMap<String, String>, QueueError> {
        Ok(self.with(|con| con.hgetall(self.job_key(id)))?)
    }

    /// Events after each job's cursor (`0` from the start), waiting up to `block` for one.
    /// Answers (job id, the event's stream id, the event).
    pub fn read_events(
        &self,
        con: &mut Connection,
        cursors: &[(String, String)],
        block: Duration,
    ) -> Result<Vec<(String, String, JobEvent)>, QueueError> {
        if cursors.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("BLOCK")
            .arg(block.as_millis() as u64)
            .arg("STREAMS");
        for (id, _) in cursors {
            cmd.arg(self.events_key(id));
        }
        for (_, cursor) in cursors {
            cmd.arg(cursor);
        }
        let reply: Option<StreamReadReply> = cmd.query(con)?;
        let mut events = Vec::new();
        let by_key: HashMap<String, &str> = cursors
            .iter()
            .map(|(id, _)| (self.events_key(id), id.as_str()))
            .collect();
        for stream in reply.map(|r| r.keys).unwrap_or_default() {
            let Some(job) = by_key.get(&stream.key) else {
                continue;
            };
            for entry in stream.ids {
                if let Some(event) = field::<String>(&entry, "event")
                    .and_then(|t| serde_json::from_str::<JobEvent>(&t).ok())
                {
                    events.push((job.to_string(), entry.id.clone(), event));
                }
            }
        }
        Ok(events)
    }

    /// A dedicated connection, for blocking reads.
    pub fn connection(&self) -> Result<Connection, QueueError> {
        Ok(self.connect()?)
    }
}

fn field<T: redis::FromRedisValue>(entry: &StreamId, name: &str) -> Option<T> {
    entry.get(name)
}

/// How a worker takes and retries jobs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// This worker's consumer name (unique among the workers).
    pub name: String,
    /// How long a job may go without its worker's sign of life before another worker takes it.
    pub visibility_timeout: Duration,
    /// Tries before a job goes to the dead-letter stream.
    pub max_attempts: u32,
    /// How long results and events are kept.
    pub result_ttl: Duration,
}

/// What a worker did with one job, for its log.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Done {
        id: String,
        seconds: f64,
    },
    AlreadyDone {
        id: String,
    },
    Cancelled {
        id: String,
    },
    Failed {
        id: String,
        error: String,
    },
    Retry {
        id: String,
        attempt: u32,
        error: String,
    },
    Dead {
        id: String,
        error: String,
    },
}

/// A worker: takes jobs from the queue and runs them on its engine until `stop` is set.
pub struct Worker<'a> {
    pub queue: &'a RedisQueue,
    pub config: WorkerConfig,
}

impl Worker<'_> {
    /// Takes and runs jobs until `stop` is set (checked between jobs, at least every 2 s),
    /// reporting each job's outcome. A lost connection is retried every second.
    pub fn run(&self, engine: &mut Engine, stop: &AtomicBool, log: &mut dyn FnMut(&Outcome)) {
        let mut con: Option<Connection> = None;
        while !stop.load(Ordering::SeqCst) {
            let connection = match con.as_mut() {
                Some(c) => c,
                None => match self.queue.connect() {
                    Ok(c) => con.insert(c),
                    Err(e) => {
                        eprintln!("icedit worker: Redis unreachable ({e}); retrying");
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                },
            };
            match self.next_entry(connection) {
                Ok(Some(entry)) => match self.handle(connection, engine, &entry) {
                    Ok(outcome) => log(&outcome),
                    Err(e) => {
                        eprintln!(
                            "icedit worker: Redis error during a job ({e}); it stays pending"
                        );
                        con = None;
                    }
                },
                Ok(None) => {}
                Err(e) => {
                    eprintln!("icedit worker: Redis error ({e}); reconnecting");
                    con = None;
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    /// A job another worker left idle past the visibility timeout, else a new one (waiting up
    /// to 2 s).
    fn next_entry(&self, con: &mut Connection) -> RedisResult<Option<StreamId>> {
        let reclaimed: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(self.queue.jobs_key())
            .arg(GROUP)
            .arg(&self.config.name)
            .arg(self.config.visibility_timeout.as_millis() as u64)
            .arg("0-0")
            .arg("COUNT")
            .arg(1)
            .query(con)?;
        if let Some(entry) = reclaimed.claimed.into_iter().next() {
            return Ok(Some(entry));
        }
        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(&self.config.name)
            .arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(2000)
            .arg("STREAMS")
            .arg(self.queue.jobs_key())
            .arg(">")
            .query(con)?;
        Ok(reply
            .and_then(|r| r.keys.into_iter().next())
            .and_then(|k| k.ids.into_iter().next()))
    }

    fn handle(
        &self,
        con: &mut Connection,
        engine: &mut Engine,
        entry: &StreamId,
    ) -> RedisResult<Outcome> {
        let q = self.queue;
        let Some(id) = field::<String>(entry, "id") else {
            // Not a job this code wrote: kept for a person to look at, not retried.
            self.dead(con, entry, "?", "the entry has no job id", 1)?;
            return Ok(Outcome::Dead {
                id: entry.id.clone(),
                error: "the entry has no job id".into(),
            });
        };
        if con.exists(q.result_key(&id))? {
            self.finish(con, entry, None)?;
            return Ok(Outcome::AlreadyDone { id });
        }
        let job_key = q.job_key(&id);
        let attempt: u32 = redis::pipe()
            .atomic()
            .hincr(&job_key, "attempts", 1)
            .hset(&job_key, "worker", &self.config.name)
            .ignore()
            .hset(&job_key, "state", "running")
            .ignore()
            .query::<(u32,)>(con)?
            .0;
        if attempt > self.config.max_attempts {
            let error: Option<String> = con.hget(&job_key, "error")?;
            let error = format!(
                "tried {} times: {}",
                attempt - 1,
                error.unwrap_or_else(|| "each worker stopped before finishing it".into())
            );
            self.dead(con, entry, &id, &error, attempt - 1)?;
            return Ok(Outcome::Dead { id, error });
        }
        let started = Instant::now();
        let result = self.run_job(con, engine, entry, &id);
        let error = match result {
            Ok(results) => {
                let json = serde_json::to_string(&results).map_err(json_error)?;
                let ttl = self.config.result_ttl.as_secs().max(1);
                // The first result stays; a second run of the job only acknowledges.
                let written: Option<String> = redis::cmd("SET")
                    .arg(q.result_key(&id))
                    .arg(json)
                    .arg("NX")
                    .arg("EX")
                    .arg(ttl)
                    .query(con)?;
                let done = written
                    .as_ref()
                    .map(|_| (id.as_str(), &JobEvent::Done, "done"));
                self.finish(con, entry, done)?;
                return Ok(if written.is_some() {
                    Outcome::Done {
                        id,
                        seconds: started.elapsed().as_secs_f64(),
                    }
                } else {
                    Outcome::AlreadyDone { id }
                });
            }
            Err(JobError::Redis(e)) => return Err(e),
            Err(JobError::Engine(EngineError::Stopped("cancelled"))) => {
                self.finish(con, entry, Some((&id, &JobEvent::Cancelled, "cancelled")))?;
                return Ok(Outcome::Cancelled { id });
            }
            // Past its deadline no try can succeed: failed, not retried.
            Err(JobError::Engine(e @ EngineError::Stopped(_))) => {
                let error = e.to_string();
                con.hset::<_, _, _, ()>(&job_key, "error", &error)?;
                let failed = JobEvent::Failed {
                    error: error.clone(),
                };
                self.finish(con, entry, Some((&id, &failed, "failed")))?;
                return Ok(Outcome::Failed { id, error });
            }
            Err(JobError::Engine(e)) => e.to_string(),
            Err(JobError::Request(e)) => e,
        };
        con.hset::<_, _, _, ()>(&job_key, "error", &error)?;
        if attempt >= self.config.max_attempts {
            let error = format!("tried {attempt} times: {error}");
            self.dead(con, entry, &id, &error, attempt)?;
            return Ok(Outcome::Dead { id, error });
        }
        // Left pending: tried again once the visibility timeout has passed.
        Ok(Outcome::Retry { id, attempt, error })
    }

    fn run_job(
        &self,
        con: &mut Connection,
        engine: &mut Engine,
        entry: &StreamId,
        id: &str,
    ) -> Result<Vec<EditResult>, JobError> {
        let q = self.queue;
        let request: EditRequest = field::<String>(entry, "request")
            .ok_or_else(|| JobError::Request("the entry has no request".into()))
            .and_then(|t| {
                serde_json::from_str(&t)
                    .map_err(|e| JobError::Request(format!("the request cannot be read: {e}")))
            })?;
        let deadline_ms = field::<u64>(entry, "deadline_ms").unwrap_or(0);
        let edit = request
            .prepare(engine.kind(), engine.config())
            .map_err(|e| JobError::Engine(e.into()))?;
        self.event(con, id, &JobEvent::Started, "running")
            .map_err(JobError::Redis)?;
        let con = std::cell::RefCell::new(con);
        let redis_error = std::cell::RefCell::new(None);
        let stop = || -> Option<&'static str> {
            let mut con = con.borrow_mut();
            let checked = (|| -> RedisResult<Option<&'static str>> {
                let cancel: Option<String> = con.hget(q.job_key(id), "cancel")?;
                Ok(if cancel.is_some() {
                    Some("cancelled")
                } else if deadline_ms > 0 && unix_ms(SystemTime::now()) >= deadline_ms {
                    Some("the request's time limit passed")
                } else {
                    None
                })
            })();
            match checked {
                Ok(reason) => reason,
                Err(e) => {
                    redis_error.borrow_mut().replace(e);
                    Some("the queue's Redis failed")
                }
            }
        };
        let mut events = |event: EngineEvent| {
            let Some(event) = JobEvent::of_engine(event) else {
                return;
            };
            let mut con = con.borrow_mut();
            if let Err(e) = self.send_event(&mut con, id, &event) {
                redis_error.borrow_mut().replace(e);
            }
        };
        // While the job runs (encoding, steps, a search's judge calls, decoding), its claim is
        // renewed from a thread of its own, so that no other worker takes it over.
        let running = AtomicBool::new(true);
        let result = std::thread::scope(|scope| {
            scope.spawn(|| self.renew_claim(&entry.id, &running));
            let result = engine.run(&edit, &mut events, &stop);
            running.store(false, Ordering::SeqCst);
            result
        });
        if let Some(e) = redis_error.into_inner() {
            return Err(JobError::Redis(e));
        }
        result.map_err(JobError::Engine)
    }

    /// Every third of the visibility timeout until `running` turns false: `XCLAIM` to itself,
    /// which resets the entry's idle time. A failure is retried at the next turn (the job
    /// itself notices a lost Redis).
    fn renew_claim(&self, entry_id: &str, running: &AtomicBool) {
        let every = self.config.visibility_timeout / 3;
        let mut con = None;
        let mut last = Instant::now();
        while running.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50).min(every));
            if last.elapsed() < every {
                continue;
            }
            last = Instant::now();
            let connection = match con.as_mut() {
                Some(c) => c,
                None => match self.queue.connect() {
                    Ok(c) => con.insert(c),
                    Err(_) => continue,
                },
            };
            let renewed: RedisResult<Value> = redis::cmd("XCLAIM")
                .arg(self.queue.jobs_key())
                .arg(GROUP)
                .arg(&self.config.name)
                .arg(0)
                .arg(entry_id)
                .arg("JUSTID")
                .query(connection);
            if renewed.is_err() {
                con = None;
            }
        }
    }

    fn send_event(&self, con: &mut Connection, id: &str, event: &JobEvent) -> RedisResult<()> {
        let mut pipe = redis::pipe();
        self.add_event(&mut pipe, id, event)?;
        pipe.query(con)
    }

    fn add_event(&self, pipe: &mut redis::Pipeline, id: &str, event: &JobEvent) -> RedisResult<()> {
        let json = serde_json::to_string(event).map_err(json_error)?;
        pipe.cmd("XADD")
            .arg(self.queue.events_key(id))
            .arg("MAXLEN")
            .arg("~")
            .arg(EVENTS_KEPT)
            .arg("*")
            .arg("event")
            .arg(json)
            .ignore();
        Ok(())
    }

    /// Sends an event and records the job's state.
    fn event(
        &self,
        con: &mut Connection,
        id: &str,
        event: &JobEvent,
        state: &str,
    ) -> RedisResult<()> {
        let mut pipe = redis::pipe();
        self.add_event(&mut pipe, id, event)?;
        pipe.hset(self.queue.job_key(id), "state", state).ignore();
        pipe.query(con)
    }

    /// Ends the job with its last event and state, and acknowledges and deletes its entry, in
    /// one transaction: no one sees the job ended while its entry is still queued, nor the
    /// reverse. The job's hash and events expire with its result.
    fn finish(
        &self,
        con: &mut Connection,
        entry: &StreamId,
        last: Option<(&str, &JobEvent, &str)>,
    ) -> RedisResult<()> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        self.add_finish(&mut pipe, entry, last)?;
        pipe.query::<()>(con)
    }

    fn add_finish(
        &self,
        pipe: &mut redis::Pipeline,
        entry: &StreamId,
        last: Option<(&str, &JobEvent, &str)>,
    ) -> RedisResult<()> {
        let q = self.queue;
        if let Some((id, event, state)) = last {
            self.add_event(pipe, id, event)?;
            pipe.hset(q.job_key(id), "state", state).ignore();
        }
        let ttl = self.config.result_ttl.as_secs().max(1) as i64;
        pipe.xack(q.jobs_key(), GROUP, &[&entry.id])
            .ignore()
            .xdel(q.jobs_key(), &[&entry.id])
            .ignore();
        if let Some(id) = field::<String>(entry, "id") {
            pipe.expire(q.job_key(&id), ttl)
                .ignore()
                .expire(q.events_key(&id), ttl)
                .ignore();
        }
        Ok(())
    }

    /// Moves the entry to the dead-letter stream with its error, and tells the job's waiters.
    fn dead(
        &self,
        con: &mut Connection,
        entry: &StreamId,
        id: &str,
        error: &str,
        attempts: u32,
    ) -> RedisResult<()> {
        let request = field::<String>(entry, "request").unwrap_or_default();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("XADD")
            .arg(self.queue.dead_key())
            .arg("*")
            .arg("id")
            .arg(id)
            .arg("error")
            .arg(error)
            .arg("attempts")
            .arg(attempts)
            .arg("request")
            .arg(request)
            .ignore()
            .hset(self.queue.job_key(id), "error", error)
            .ignore();
        let failed = JobEvent::Failed {
            error: error.to_string(),
        };
        self.add_finish(&mut pipe, entry, Some((id, &failed, "dead")))?;
        pipe.query::<()>(con)
    }
}

enum JobError {
    Redis(redis::RedisError),
    Engine(EngineError),
    Request(String),
}

fn json_error(e: serde_json::Error) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Client, "cannot write JSON", e.to_string()))
}
