//! `icedit serve`: one loaded edit engine behind HTTP.
//!
//! - OpenAI's images API: `POST /v1/images/edits` (multipart `image`, `prompt`, optional `mask`,
//!   `n`, `size`, `response_format=b64_json`; `seed`, `steps`, `guidance`, `negative_prompt`,
//!   `true_cfg_scale` as extra fields, which the SDKs send with `extra_body`), answered when the
//!   images are ready, in OpenAI's response and error shapes.
//! - A job API: `POST /v1/edits` (JSON) queues a job and answers 202 with its id;
//!   `GET /v1/jobs/{id}` (state, progress, PNGs with their recipes), `GET /v1/jobs/{id}/events`
//!   (server-sent events: queued, started, step i/N, done or failed), `DELETE /v1/jobs/{id}`
//!   (cancel). `GET /healthz`, `GET /metrics` (Prometheus text).
//! - One engine thread runs one job at a time from a bounded queue (full: 429 with
//!   `Retry-After`); bodies and images over the limits are refused (413) before decoding; a
//!   per-request time limit; bearer API keys compared in constant time; nothing in a request
//!   names a file or URL the server reads.
//! - With a queue (`--queue redis://...`), jobs go to a Redis stream that `icedit worker`s on
//!   other machines consume (see [`queue`]); the server forwards their events and results.

pub mod engine;
mod http;
pub mod jobs;
pub mod queue;
pub mod settings;

pub use engine::{EditRequest, EditResult, Engine, EngineConfig, PreparedEdit};
pub use http::{router, AppState, ServerConfig};
pub use jobs::{JobEvent, JobState, Jobs};
pub use queue::{Outcome, RedisQueue, Worker, WorkerConfig};
