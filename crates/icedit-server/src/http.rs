//! The HTTP API over [`Jobs`]: OpenAI's images edits endpoint, the job API, health and metrics.

use std::convert::Infallible;
use std::io::Cursor;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use futures_util::stream::{self, Stream, StreamExt};
use icedit_pipeline::edit::JobOptions;
use icedit_pipeline::image_io::{decode_alpha_mask, decode_mask, decode_rgb};
use icedit_pipeline::PipelineKind;
use serde::Deserialize;
use serde_json::json;

use crate::engine::{EngineConfig, SearchRequest};
use crate::jobs::{Job, JobEvent, JobState, Jobs, SubmitError};
use crate::settings::{read_with_settings, RequestSettings, SettingsError};

/// The server's limits and keys.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Bearer tokens accepted; empty: no authentication (a server on 127.0.0.1).
    pub api_keys: Vec<String>,
    /// Largest request body, in bytes (uploads included).
    pub max_body_bytes: usize,
    /// Largest image, in pixels, read from its header before decoding.
    pub max_pixels: u64,
    /// How long a request may take, queue included.
    pub timeout: Option<Duration>,
    /// The model's name, for `/healthz` and OpenAI's `model` field.
    pub model_name: String,
}

#[derive(Clone)]
pub struct AppState {
    pub jobs: Arc<Jobs>,
    pub kind: PipelineKind,
    pub engine: Arc<EngineConfig>,
    pub config: Arc<ServerConfig>,
}

/// The routes; `/healthz` answers without a key.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/images/edits", post(openai_edit))
        .route("/v1/edits", post(submit_edit))
        .route("/v1/jobs/{id}", get(job_status).delete(cancel_job))
        .route("/v1/jobs/{id}/events", get(job_events))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/healthz", get(health))
        .merge(api)
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            refuse_declared_oversize,
        ))
        .with_state(state)
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<&'static str>,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        };
        let body = json!({"error": {
            "message": self.message,
            "type": kind,
            "param": self.param,
            "code": self.status.as_u16().to_string(),
        }});
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<icedit_pipeline::PipelineError> for ApiError {
    fn from(err: icedit_pipeline::PipelineError) -> Self {
        Self::bad(err.to_string())
    }
}

/// A body whose declared length is over the limit is refused with 413 after it is read and
/// dropped (up to 4x the limit): a server that answers while the client is still sending closes
/// a connection holding unread data, which resets it, and the client sees a transport error
/// instead of the 413. Bodies without a length are cut off by `DefaultBodyLimit`.
async fn refuse_declared_oversize(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let limit = state.config.max_body_bytes as u64;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let Some(declared) = declared.filter(|&n| n > limit) else {
        return Ok(next.run(request).await);
    };
    if declared <= limit.saturating_mul(4) {
        let mut body = request.into_body().into_data_stream();
        while let Some(Ok(_)) = body.next().await {}
    }
    Err(ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the request is larger than this server takes ({declared} bytes; at most {limit})"),
    ))
}

async fn authorize(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if state.config.api_keys.is_empty() {
        return Ok(next.run(request).await);
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Every key is compared, each in time independent of where it differs.
    let known = state.config.api_keys.iter().fold(false, |found, key| {
        found | constant_time_eq(key.as_bytes(), given.as_bytes())
    });
    if !known {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "a valid API key is required: send `Authorization: Bearer KEY`",
        ));
    }
    Ok(next.run(request).await)
}

/// Equality whose time depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | ((a.len() ^ b.len()) >> 8) as u8;
    for (i, x) in a.iter().enumerate() {
        diff |= x ^ b.get(i).copied().unwrap_or(!x);
    }
    diff == 0 && a.len() == b.len()
}

async fn health(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "status": "ok",
        "model": state.config.model_name,
        "pipeline": state.kind.diffusers_class(),
    }))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let counts = state.jobs.counts();
    let mut text = String::new();
    text +=
        "# HELP icedit_queue_depth Jobs waiting for the engine.\n# TYPE icedit_queue_depth gauge\n";
    text += &format!(
        "icedit_queue_depth {}\n",
        counts.get(&JobState::Queued).copied().unwrap_or(0)
    );
    let jobs = Arc::clone(&state.jobs);
    if let Ok(Some(Ok(depth))) =
        tokio::task::spawn_blocking(move || jobs.shared_queue_depth()).await
    {
        text += "# HELP icedit_redis_queue_length Jobs waiting or running in the Redis queue.\n# TYPE icedit_redis_queue_length gauge\n";
        text += &format!("icedit_redis_queue_length {depth}\n");
    }
    text += "# HELP icedit_jobs Jobs known to the server, by state.\n# TYPE icedit_jobs gauge\n";
    for s in JobState::ALL {
        text += &format!(
            "icedit_jobs{{state=\"{}\"}} {}\n",
            s.name(),
            counts.get(&s).copied().unwrap_or(0)
        );
    }
    let c = &state.jobs.counters;
    text +=
        "# HELP icedit_step_seconds Time of denoising steps.\n# TYPE icedit_step_seconds summary\n";
    text += &format!(
        "icedit_step_seconds_sum {:.6}\nicedit_step_seconds_count {}\n",
        c.step_micros.load(Ordering::Relaxed) as f64 / 1e6,
        c.steps.load(Ordering::Relaxed)
    );
    text += "# HELP icedit_rejected_total Requests refused because the queue was full.\n# TYPE icedit_rejected_total counter\n";
    text += &format!(
        "icedit_rejected_total {}\n",
        c.rejected_full.load(Ordering::Relaxed)
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

/// The fields both edit endpoints take, before validation.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EditFields {
    /// Base64 (job API) — the OpenAI endpoint fills the raw bytes instead.
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    mask: Option<String>,
    #[serde(default, alias = "prompt")]
    instruction: Option<String>,
    #[serde(default)]
    size: Option<String>,
    /// Seeds, steps, search, adapters, ...: read beside these fields, as every entry point
    /// reads them.
    #[serde(skip)]
    settings: RequestSettings,
}

/// Builds and validates the request (decoding the images) off the async threads.
async fn prepare(
    state: &AppState,
    fields: EditFields,
    image: Vec<u8>,
    mask: Option<(Vec<u8>, bool)>,
) -> Result<crate::PreparedEdit, ApiError> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || {
        for (bytes, param) in
            std::iter::once((&image, "image")).chain(mask.iter().map(|(m, _)| (m, "mask")))
        {
            check_pixels(bytes, state.config.max_pixels, param)?;
        }
        let photo = decode_rgb(&image, "the uploaded image")
            .map_err(|e| ApiError::bad(e.to_string()).param("image"))?
            .rgb;
        let mask = match mask {
            // OpenAI's masks edit where they are transparent; the job API's where they are white.
            Some((bytes, true)) => Some(decode_alpha_mask(&bytes, "the uploaded mask")),
            Some((bytes, false)) => Some(decode_mask(&bytes, "the uploaded mask")),
            None => None,
        }
        .transpose()
        .map_err(|e| ApiError::bad(e.to_string()).param("mask"))?;
        let instruction = fields
            .instruction
            .filter(|i| !i.trim().is_empty())
            .ok_or_else(|| {
                ApiError::bad("the prompt (the instruction) is missing or empty").param("prompt")
            })?;
        let settings = fields.settings.check(random_seed)?;
        let mut options = JobOptions::default();
        if let Some(size) = fields.size.as_deref().filter(|s| *s != "auto") {
            let (w, h) = size
                .split_once('x')
                .and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?)))
                .ok_or_else(|| {
                    ApiError::bad(format!("size {size:?}: give WIDTHxHEIGHT or auto")).param("size")
                })?;
            match state.kind {
                // ICEdit edits at a working width; the height follows the photo.
                PipelineKind::Fill => options.width = Some(w),
                PipelineKind::Kontext => {
                    if mask.is_none() {
                        (options.width, options.height) = (Some(w), Some(h));
                    }
                }
            }
        }
        let request = settings.into_request(photo, mask, instruction, options);
        Ok(request.prepare(state.kind, &state.engine)?)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

impl From<SettingsError> for ApiError {
    fn from(e: SettingsError) -> Self {
        let error = ApiError::bad(e.message);
        match e.param {
            Some(param) => error.param(param),
            None => error,
        }
    }
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    h.finish() >> 11
}

/// Refuses an image whose header says it is larger than the limit, before decoding it.
fn check_pixels(bytes: &[u8], max_pixels: u64, param: &'static str) -> Result<(), ApiError> {
    let reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ApiError::bad(e.to_string()).param(param))?;
    if reader.format().is_none() {
        return Err(ApiError::bad(format!(
            "the {param} is not a PNG, JPEG, WebP, BMP or TIFF image"
        ))
        .param(param));
    }
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| ApiError::bad(format!("the {param} cannot be read: {e}")).param(param))?;
    if w as u64 * h as u64 > max_pixels {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the {param} is {w}x{h} pixels, more than this server's {max_pixels}; resize it"
            ),
        )
        .param(param));
    }
    Ok(())
}

/// Queues the edit (on a Redis queue, a network round trip: off the async threads).
async fn submit(state: &AppState, edit: crate::PreparedEdit) -> Result<Arc<Job>, ApiError> {
    let jobs = Arc::clone(&state.jobs);
    let submitted = tokio::task::spawn_blocking(move || jobs.submit(edit))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    submitted.map_err(|e| match e {
        SubmitError::Full => ApiError {
            retry_after: Some(5),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "the queue is full; retry after a few seconds",
            )
        },
        SubmitError::ShuttingDown => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        ),
        SubmitError::Queue(error) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the job queue is unavailable: {error}"),
        ),
    })
}

async fn openai_edit(
    State(state): State<AppState>,
    mut form: Multipart,
) -> Result<Json<serde_json::Value>, ApiError> {
    let mut fields = EditFields::default();
    let (mut image, mut mask) = (None, None);
    let mut format = None;
    while let Some(field) = form.next_field().await.map_err(multipart_error)? {
        let name = field.name().unwrap_or_default().to_string();
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).trim().to_string();
        let number = |param: &'static str, bytes: &[u8]| {
            text(bytes)
                .parse::<f64>()
                .map_err(|_| ApiError::bad(format!("{param} must be a number")).param(param))
        };
        let bytes = field.bytes().await.map_err(multipart_error)?;
        match name.as_str() {
            "image" | "image[]" => {
                if image.replace(bytes.to_vec()).is_some() {
                    return Err(ApiError::bad("one image per edit").param("image"));
                }
            }
            "mask" => mask = Some(bytes.to_vec()),
            "prompt" => fields.instruction = Some(text(&bytes)),
            "n" => fields.settings.n = Some(number("n", &bytes)? as usize),
            "seed" => fields.settings.seed = Some(number("seed", &bytes)? as u64),
            // The seeds listed, as the SDK sends `extra_body={"seeds": [...]}` in a form (one
            // field an item), or comma separated.
            "seeds[]" | "seeds" => {
                let seeds = fields.settings.seeds.get_or_insert_with(Vec::new);
                for item in text(&bytes)
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                {
                    seeds.push(item.parse::<u64>().map_err(|_| {
                        ApiError::bad(format!("seeds: {item:?} is not a seed")).param("seeds")
                    })?);
                }
            }
            "steps" => fields.settings.steps = Some(number("steps", &bytes)? as usize),
            "guidance" | "guidance_scale" => {
                fields.settings.guidance = Some(number("guidance", &bytes)? as f32)
            }
            "size" => fields.size = Some(text(&bytes)),
            "negative_prompt" => fields.settings.negative_prompt = Some(text(&bytes)),
            "true_cfg_scale" => {
                fields.settings.true_cfg_scale = Some(number("true_cfg_scale", &bytes)? as f32)
            }
            "response_format" => format = Some(text(&bytes)),
            // A list as the SDK sends it in a form (one field an item), or comma separated.
            "adapters[]" => fields
                .settings
                .adapters
                .get_or_insert_with(Vec::new)
                .push(text(&bytes)),
            "adapters" => fields
                .settings
                .adapters
                .get_or_insert_with(Vec::new)
                .extend(
                    text(&bytes)
                        .split(',')
                        .map(str::trim)
                        .filter(|a| !a.is_empty())
                        .map(str::to_string),
                ),
            // A search, as the SDK sends `extra_body={"search": {...}}` in a form.
            "search[early_steps]" | "early_steps" => {
                search_field(&mut fields).early_steps = number("early_steps", &bytes)? as usize
            }
            "search[early_filter]" | "early_filter" => {
                search_field(&mut fields).early_filter = choice("early_filter", &text(&bytes))?
            }
            "search[selection]" | "selection" => {
                search_field(&mut fields).selection = choice("selection", &text(&bytes))?
            }
            // OpenAI fields with no meaning here (model, user, quality, background, ...).
            _ => {}
        }
    }
    if let Some(f) = format.filter(|f| f != "b64_json") {
        return Err(ApiError::bad(format!(
            "response_format {f:?}: this server answers b64_json only"
        ))
        .param("response_format"));
    }
    let image = image.ok_or_else(|| ApiError::bad("the image is missing").param("image"))?;
    let edit = prepare(&state, fields, image, mask.map(|m| (m, true))).await?;
    let job = submit(&state, edit).await?;
    let status = wait(&job, state.config.timeout).await?;
    let data: Vec<_> = status
        .results
        .iter()
        .map(|r| {
            json!({
                "b64_json": base64::engine::general_purpose::STANDARD.encode(&r.png),
                "revised_prompt": r.recipe.prompt,
            })
        })
        .collect();
    Ok(Json(json!({
        "created": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        "data": data,
    })))
}

/// The request's search settings, started when a form names the first of them.
fn search_field(fields: &mut EditFields) -> &mut SearchRequest {
    fields.settings.search.get_or_insert(SearchRequest {
        early_steps: 0,
        early_filter: Default::default(),
        selection: Default::default(),
    })
}

/// A form's word for one of the search's choices (`continue`, `halving`, ...).
fn choice<T: serde::de::DeserializeOwned>(param: &'static str, text: &str) -> Result<T, ApiError> {
    serde_json::from_value(serde_json::Value::String(text.to_string())).map_err(|_| {
        ApiError::bad(format!("{param} {text:?} is not one of its choices")).param(param)
    })
}

fn multipart_error(err: axum::extract::multipart::MultipartError) -> ApiError {
    let status = err.status();
    let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
        "the request is larger than this server takes".to_string()
    } else {
        format!("malformed multipart form: {}", err.body_text())
    };
    ApiError::new(status, message)
}

/// Waits for a job to finish; its results, or the error it ended with.
async fn wait(job: &Job, timeout: Option<Duration>) -> Result<crate::jobs::JobStatus, ApiError> {
    let (status, mut events) = job.subscribe();
    if !status.state.is_final() {
        let until_final = async {
            loop {
                match events.recv().await {
                    Ok(JobEvent::Done | JobEvent::Failed { .. } | JobEvent::Cancelled) => break,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        };
        match timeout {
            // A little beyond the job's own deadline, which stops it between steps.
            Some(t) => {
                if tokio::time::timeout(t + Duration::from_secs(30), until_final)
                    .await
                    .is_err()
                {
                    job.cancel();
                    return Err(ApiError::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "the edit did not finish in the server's time limit",
                    ));
                }
            }
            None => until_final.await,
        }
    }
    let status = job.status();
    match status.state {
        JobState::Done => Ok(status),
        JobState::Cancelled => Err(ApiError::new(StatusCode::CONFLICT, "the job was cancelled")),
        _ => {
            let error = status.error.unwrap_or_else(|| "the job failed".into());
            let code = if error.contains("time limit") {
                StatusCode::GATEWAY_TIMEOUT
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            Err(ApiError::new(code, error))
        }
    }
}

async fn submit_edit(
    State(state): State<AppState>,
    body: Result<Json<serde_json::Map<String, serde_json::Value>>, JsonRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    // Malformed and mistyped JSON are both a bad request, as OpenAI answers them.
    let Json(object) = body.map_err(|e| match e.status() {
        StatusCode::UNPROCESSABLE_ENTITY => ApiError::bad(e.body_text()),
        status => ApiError::new(status, e.body_text()),
    })?;
    let (mut fields, settings) = read_with_settings::<EditFields>(object)?;
    fields.settings = settings;
    let b64 = |text: &str, param: &'static str| {
        base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|e| ApiError::bad(format!("{param} is not base64: {e}")).param(param))
    };
    let image = b64(
        &fields
            .image
            .take()
            .ok_or_else(|| ApiError::bad("image (base64) is missing").param("image"))?,
        "image",
    )?;
    let mask = fields
        .mask
        .take()
        .map(|m| b64(&m, "mask"))
        .transpose()?
        .map(|m| (m, false));
    let edit = prepare(&state, fields, image, mask).await?;
    let job = submit(&state, edit).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(
            json!({"id": job.id, "state": "queued", "events": format!("/v1/jobs/{}/events", job.id)}),
        ),
    ))
}

/// The job, known here or (with a queue) found in Redis.
async fn find(state: &AppState, id: &str) -> Result<Arc<Job>, ApiError> {
    if let Some(job) = state.jobs.get(id) {
        return Ok(job);
    }
    let (jobs, key) = (Arc::clone(&state.jobs), id.to_string());
    let adopted = tokio::task::spawn_blocking(move || jobs.adopt(&key))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the job queue is unavailable: {e}"),
            )
        })?;
    adopted.ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no job {id:?}")))
}

async fn job_status(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let job = find(&state, &id).await?;
    let status = job.status();
    Ok(Json(json!({
        "id": job.id,
        "state": status.state,
        "progress": status.progress,
        "seeds": job.seeds,
        "results": status.results,
        "error": status.error,
        "seconds": job.created.elapsed().as_secs_f64(),
    })))
}

async fn cancel_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let job = find(&state, &id).await?;
    if !job.cancel() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "job {id} has already finished ({})",
                job.status().state.name()
            ),
        ));
    }
    Ok(Json(json!({"id": id, "cancelling": true})))
}

async fn job_events(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let job = find(&state, &id).await?;
    let (status, receiver) = job.subscribe();
    // What happened before the subscription, then what comes.
    let mut past = vec![JobEvent::Queued];
    if status.state != JobState::Queued {
        past.push(JobEvent::Started);
    }
    past.extend(status.progress.clone());
    match status.state {
        JobState::Done => past.push(JobEvent::Done),
        JobState::Cancelled => past.push(JobEvent::Cancelled),
        JobState::Failed => past.push(JobEvent::Failed {
            error: status.error.clone().unwrap_or_default(),
        }),
        _ => {}
    }
    // Each event once, ending right after the final one.
    let events = stream::unfold(
        (past.into_iter(), receiver, false),
        |(mut past, mut live, ended)| async move {
            if ended {
                return None;
            }
            let event = match past.next() {
                Some(event) => event,
                None => loop {
                    match live.recv().await {
                        Ok(event) => break event,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                    }
                },
            };
            let last = matches!(
                event,
                JobEvent::Done | JobEvent::Failed { .. } | JobEvent::Cancelled
            );
            Some((event, (past, live, last)))
        },
    );
    let to_sse = |e: JobEvent| {
        let name = match &e {
            JobEvent::Queued => "queued",
            JobEvent::Started => "started",
            JobEvent::Step { .. } => "step",
            JobEvent::SearchStep { .. } => "search_step",
            JobEvent::Done => "done",
            JobEvent::Failed { .. } => "failed",
            JobEvent::Cancelled => "cancelled",
        };
        Ok::<_, Infallible>(
            Event::default()
                .event(name)
                .json_data(&e)
                .unwrap_or_else(|_| Event::default().event(name)),
        )
    };
    Ok(Sse::new(events.map(to_sse)).keep_alive(KeepAlive::default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret1"));
        assert!(!constant_time_eq(b"secret", b""));
        assert!(constant_time_eq(b"", b""));
    }
}
