//! The online side of a Hub repo: a small blocking client over ureq that trusts nothing
//! the server says with a path in it.
//!
//! Per run (one [`crate::ModelRepo`]), the revision is resolved to a commit once, with the
//! repo info API (which also gives the file listing); every file is then fetched from
//! `resolve/{commit}/{path}`, so one run never mixes two commits.
//!
//! A file is fetched as `huggingface_hub` does it: a `HEAD` without following redirects
//! (relative ones excepted) gives the commit (`X-Repo-Commit`), the ETag (`X-Linked-Etag`,
//! else `ETag`, weak marker and quotes stripped) and the size (`X-Linked-Size`, else
//! `Content-Length`). The commit must be the run's commit and the ETag a plain hash, or the
//! answer is refused ([`crate::HubError::UntrustedResponse`]) before anything is written.
//! A blob already stored under that ETag is reused; otherwise the body is fetched with
//! `GET` (following redirects by hand: http or https only, never https to http, the token
//! only to the Hub's own origin) into a uniquely named `blobs/{etag}.*.incomplete` file,
//! checked against the announced size, and renamed to `blobs/{etag}` only when complete.
//! Then `snapshots/{commit}/{path}` is linked to it. A failed download deletes its
//! temporary file: no partial blob, no snapshot entry is ever left.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::cache::{is_commit_hash, is_safe_etag, is_safe_relative, CachedRepo, MAX_ETAG_LEN};
use crate::error::{printable, MissingReason, UntrustedResponse};
use crate::options::HubOptions;

/// Redirects followed for one request before giving up.
const MAX_REDIRECTS: usize = 10;
/// The repo info is JSON of a few hundred kB at most; more is not a Hub answer.
const MAX_INFO_BYTES: u64 = 64 << 20;
/// Suffix of a blob being downloaded, as `huggingface_hub` names it.
pub(crate) const INCOMPLETE_SUFFIX: &str = ".incomplete";

/// Why one request to the Hub failed.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub(crate) reason: MissingReason,
    pub(crate) detail: String,
}

/// A failed request, or an answer refused as untrustworthy.
#[derive(Debug, Clone)]
pub(crate) enum RemoteError {
    Failed(Failure),
    Untrusted(Box<UntrustedResponse>),
}

impl From<Failure> for RemoteError {
    fn from(failure: Failure) -> Self {
        Self::Failed(failure)
    }
}

#[derive(Clone, Copy)]
enum Request {
    Listing,
    Download,
}

/// What the Hub says the revision is now: its commit and its files.
#[derive(Debug)]
pub(crate) struct RemoteSnapshot {
    pub(crate) commit: String,
    pub(crate) files: BTreeSet<String>,
}

pub(crate) struct Remote {
    /// Follows no redirects: each one is checked and followed by hand.
    agent: ureq::Agent,
    endpoint: String,
    repo_id: String,
    revision: String,
    token: Option<String>,
    retries: usize,
    progress: bool,
}

/// What a `HEAD` on a file told.
struct Metadata {
    etag: String,
    /// The size announced for the body, when announced.
    size: Option<u64>,
    /// Where to `GET` the body: the file's URL, or where the Hub redirected to (a CDN).
    location: String,
}

impl Remote {
    pub(crate) fn new(options: &HubOptions, repo_id: &str, revision: &str) -> Self {
        let agent = ureq::AgentBuilder::new()
            .try_proxy_from_env(true)
            .redirects(0)
            .timeout_connect(Duration::from_secs(30))
            .timeout_read(Duration::from_secs(120))
            .user_agent(concat!("icedit-hub/", env!("CARGO_PKG_VERSION"), "; rust"))
            .build();
        Self {
            agent,
            endpoint: options.endpoint.clone(),
            repo_id: repo_id.to_string(),
            revision: revision.to_string(),
            token: options.token.clone(),
            retries: options.download_retries,
            progress: options.progress,
        }
    }

    /// Asks the Hub which commit the revision is now, and the files of that commit.
    pub(crate) fn revalidate(&self) -> Result<RemoteSnapshot, RemoteError> {
        #[derive(serde::Deserialize)]
        struct Info {
            sha: Option<String>,
            #[serde(default)]
            siblings: Vec<Sibling>,
        }
        #[derive(serde::Deserialize)]
        struct Sibling {
            rfilename: String,
        }

        let url = format!(
            "{}/api/models/{}/revision/{}",
            self.endpoint,
            self.repo_id,
            encode(&self.revision, false)
        );
        let response = self.get(&url, None, None, Request::Listing)?;
        let mut body = String::new();
        response
            .into_reader()
            .take(MAX_INFO_BYTES)
            .read_to_string(&mut body)
            .map_err(|error| self.io_failure(&error, "reading the repo info"))?;
        let info: Info = serde_json::from_str(&body).map_err(|error| Failure {
            reason: MissingReason::Failed,
            detail: format!("the repo info from {url} is not what the Hub sends: {error}"),
        })?;
        let Some(commit) = info.sha else {
            return Err(Failure {
                reason: MissingReason::Failed,
                detail: format!("the repo info from {url} names no commit (`sha`)"),
            }
            .into());
        };
        if !is_commit_hash(&commit) {
            return Err(self.untrusted(
                None,
                "the commit (`sha`) in the repo info",
                &commit,
                NOT_A_COMMIT,
            ));
        }
        if is_commit_hash(&self.revision) && commit != self.revision {
            return Err(self.untrusted(
                None,
                "the commit (`sha`) in the repo info",
                &commit,
                &format!(
                    "differs from the commit `{}` that was asked for",
                    self.revision
                ),
            ));
        }
        Ok(RemoteSnapshot {
            commit,
            files: info
                .siblings
                .into_iter()
                .map(|sibling| sibling.rfilename)
                .collect(),
        })
    }

    /// Makes `relative` of snapshot `commit` available in the cache (downloading its blob
    /// unless a blob with its ETag is already there) and returns its snapshot path.
    pub(crate) fn download(
        &self,
        relative: &str,
        commit: &str,
        cache: &CachedRepo,
    ) -> Result<PathBuf, RemoteError> {
        if !is_safe_relative(relative) {
            return Err(self.untrusted(
                Some(relative),
                "the file name",
                relative,
                "does not stay inside the snapshot folder",
            ));
        }
        if !is_commit_hash(commit) {
            return Err(self.untrusted(Some(relative), "the commit", commit, NOT_A_COMMIT));
        }
        let url = format!(
            "{}/{}/resolve/{commit}/{}",
            self.endpoint,
            self.repo_id,
            encode(relative, true)
        );
        let metadata = self.metadata(&url, relative, commit)?;
        let blob = cache
            .blob_path(&metadata.etag)
            .map_err(|error| self.disk_failure(cache.dir(), &error))?;
        if !blob.is_file() {
            self.fetch_blob(&metadata, relative, &blob)?;
        }
        cache
            .link(commit, relative, &metadata.etag)
            .map_err(|error| self.disk_failure(cache.dir(), &error).into())
    }

    /// `HEAD` on the file, following only relative redirects, and the checked answer.
    fn metadata(&self, url: &str, relative: &str, commit: &str) -> Result<Metadata, RemoteError> {
        let mut current = url.to_string();
        let mut hops = 0;
        let (response, redirect) = loop {
            let mut request = self.agent.head(&current).set("Accept-Encoding", "identity");
            if let Some(token) = self.token_for(&current) {
                request = request.set("Authorization", &format!("Bearer {token}"));
            }
            let response = request
                .call()
                .map_err(|error| self.classify(error, Request::Download))?;
            if !is_redirect(response.status()) {
                break (response, None);
            }
            let location = self.location(&response, &current, Some(relative))?;
            // Relative redirects (a renamed repo) are followed; an absolute one (a CDN) is
            // where the body will come from, and its headers describe the file.
            let relative_redirect = response
                .header("location")
                .is_some_and(|raw| scheme_of(raw).is_none() && !raw.starts_with("//"));
            if relative_redirect && hops < MAX_REDIRECTS {
                hops += 1;
                current = location;
                continue;
            }
            break (response, Some(location));
        };

        match response.header("x-repo-commit") {
            Some(value) if !is_commit_hash(value) => {
                return Err(self.untrusted(
                    Some(relative),
                    "the X-Repo-Commit header",
                    value,
                    NOT_A_COMMIT,
                ));
            }
            Some(value) if value != commit => {
                return Err(self.untrusted(
                    Some(relative),
                    "the X-Repo-Commit header",
                    value,
                    &format!("differs from the commit `{commit}` this run uses"),
                ));
            }
            _ => {}
        }

        let (field, raw_etag) = match (response.header("x-linked-etag"), response.header("etag")) {
            (Some(linked), _) => ("the X-Linked-Etag header", linked),
            (None, Some(etag)) => ("the ETag header", etag),
            (None, None) => {
                return Err(Failure {
                    reason: MissingReason::Failed,
                    detail: format!(
                        "the answer for {current} carries no ETag: is {} a Hugging Face Hub?",
                        self.endpoint
                    ),
                }
                .into())
            }
        };
        let etag = normalize_etag(raw_etag)
            .map_err(|problem| self.untrusted(Some(relative), field, raw_etag, problem))?;

        let size_header = match response.header("x-linked-size") {
            Some(size) => Some(("the X-Linked-Size header", size)),
            // A redirect's Content-Length is that of the redirect's own body.
            None if redirect.is_none() => response
                .header("content-length")
                .map(|size| ("the Content-Length header", size)),
            None => None,
        };
        let size = match size_header {
            Some((field, value)) => Some(value.trim().parse::<u64>().map_err(|_| {
                self.untrusted(Some(relative), field, value, "is not a byte count")
            })?),
            None => None,
        };
        Ok(Metadata {
            etag,
            size,
            location: redirect.unwrap_or(current),
        })
    }

    /// Downloads the body into a temporary file next to `blob`, then renames it to `blob`.
    fn fetch_blob(
        &self,
        metadata: &Metadata,
        relative: &str,
        blob: &Path,
    ) -> Result<(), RemoteError> {
        static DOWNLOADS: AtomicU64 = AtomicU64::new(0);
        let dir = blob.parent().expect("blobs/ holds the blob");
        std::fs::create_dir_all(dir).map_err(|error| self.disk_failure(dir, &error))?;
        let temp = dir.join(format!(
            "{}.{}-{}{INCOMPLETE_SUFFIX}",
            metadata.etag,
            std::process::id(),
            DOWNLOADS.fetch_add(1, Ordering::Relaxed)
        ));
        let result = File::options()
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(|error| self.disk_failure(&temp, &error).into())
            .and_then(|mut file| {
                self.fetch_into(metadata, relative, &mut file, &temp)?;
                file.sync_all()
                    .map_err(|error| self.disk_failure(&temp, &error).into())
            })
            .and_then(|()| {
                std::fs::rename(&temp, blob).map_err(|error| self.disk_failure(blob, &error).into())
            });
        if result.is_err() {
            // Best effort: a leftover is never taken for a blob (it is not named like one).
            let _ = std::fs::remove_file(&temp);
        }
        result
    }

    /// The body into `file`, resuming after a broken transfer up to `retries` times.
    fn fetch_into(
        &self,
        metadata: &Metadata,
        relative: &str,
        file: &mut File,
        temp: &Path,
    ) -> Result<(), RemoteError> {
        let mut written = 0u64;
        let mut attempt = 0;
        let mut progress = Progress::new(self.progress, relative, metadata.size);
        loop {
            match self.fetch_attempt(metadata, relative, file, temp, &mut written, &mut progress) {
                Ok(()) => {
                    progress.finish();
                    return Ok(());
                }
                Err(Attempt::Broken(_)) if attempt < self.retries => attempt += 1,
                Err(Attempt::Broken(failure)) => {
                    progress.finish();
                    return Err(failure.into());
                }
                Err(Attempt::Fatal(error)) => {
                    progress.finish();
                    return Err(error);
                }
            }
        }
    }

    fn fetch_attempt(
        &self,
        metadata: &Metadata,
        relative: &str,
        file: &mut File,
        temp: &Path,
        written: &mut u64,
        progress: &mut Progress,
    ) -> Result<(), Attempt> {
        let disk = |error: std::io::Error| Attempt::Fatal(self.disk_failure(temp, &error).into());
        let range = (*written > 0).then_some(*written);
        let response = self
            .get(&metadata.location, Some(relative), range, Request::Download)
            .map_err(|error| match error {
                RemoteError::Failed(failure) if failure.reason == MissingReason::Network => {
                    Attempt::Broken(failure)
                }
                other => Attempt::Fatal(other),
            })?;
        match (response.status(), range) {
            (206, Some(start)) if content_range_start(&response) == Some(start) => {}
            (200, _) => {
                // The whole body again (no resume): start over.
                file.set_len(0).map_err(disk)?;
                file.seek(SeekFrom::Start(0)).map_err(disk)?;
                *written = 0;
                progress.restart();
            }
            (status, _) => {
                return Err(Attempt::Fatal(
                    Failure {
                        reason: MissingReason::Failed,
                        detail: format!(
                            "unexpected answer {status} to the download of `{relative}` from {}",
                            response.get_url()
                        ),
                    }
                    .into(),
                ))
            }
        }
        let length = match response.header("content-length") {
            Some(value) => Some(value.trim().parse::<u64>().map_err(|_| {
                Attempt::Fatal(self.untrusted(
                    Some(relative),
                    "the Content-Length header of the download",
                    value,
                    "is not a byte count",
                ))
            })?),
            None => None,
        };
        if let (Some(size), Some(length)) = (metadata.size, length) {
            if *written + length != size {
                return Err(Attempt::Fatal(self.untrusted(
                    Some(relative),
                    "the Content-Length header of the download",
                    &length.to_string(),
                    &format!("does not match the size of {size} bytes the Hub announced"),
                )));
            }
        }
        let total = metadata.size.or(length.map(|length| *written + length));

        // One byte more than announced is read, to tell a longer body.
        let mut body = response
            .into_reader()
            .take(total.map_or(u64::MAX, |total| total - *written + 1));
        let mut buffer = vec![0u8; 1 << 16];
        loop {
            let count = match body.read(&mut buffer) {
                Ok(0) => break,
                Ok(count) => count,
                Err(error) if error.kind() == ErrorKind::Interrupted => continue,
                Err(error) => {
                    let broken = is_transfer_error(error.kind());
                    let failure = Failure {
                        reason: if broken {
                            MissingReason::Network
                        } else {
                            MissingReason::Failed
                        },
                        detail: self.broke_off(relative, *written, total, &error.to_string()),
                    };
                    return Err(if broken {
                        Attempt::Broken(failure)
                    } else {
                        Attempt::Fatal(failure.into())
                    });
                }
            };
            file.write_all(&buffer[..count]).map_err(disk)?;
            *written += count as u64;
            progress.advance(count as u64);
        }
        match total {
            Some(total) if *written < total => Err(Attempt::Broken(Failure {
                reason: MissingReason::Network,
                detail: self.broke_off(relative, *written, Some(total), "the body ended early"),
            })),
            Some(total) if *written > total => Err(Attempt::Fatal(self.untrusted(
                Some(relative),
                "the body of the download",
                &format!("{}+ bytes", *written),
                &format!("is longer than the {total} bytes announced"),
            ))),
            _ => Ok(()),
        }
    }

    /// `GET`, following redirects by hand (checked, at most [`MAX_REDIRECTS`]).
    fn get(
        &self,
        url: &str,
        file: Option<&str>,
        range: Option<u64>,
        kind: Request,
    ) -> Result<ureq::Response, RemoteError> {
        let mut current = url.to_string();
        for _ in 0..=MAX_REDIRECTS {
            let mut request = self.agent.get(&current).set("Accept-Encoding", "identity");
            if let Some(token) = self.token_for(&current) {
                request = request.set("Authorization", &format!("Bearer {token}"));
            }
            if let Some(start) = range {
                request = request.set("Range", &format!("bytes={start}-"));
            }
            let response = request.call().map_err(|error| self.classify(error, kind))?;
            if !is_redirect(response.status()) {
                return Ok(response);
            }
            current = self.location(&response, &current, file)?;
        }
        Err(Failure {
            reason: MissingReason::Failed,
            detail: format!("more than {MAX_REDIRECTS} redirects from {url}"),
        }
        .into())
    }

    /// Where a redirect leads, refused unless it stays on http or https (never https to
    /// http).
    fn location(
        &self,
        response: &ureq::Response,
        current: &str,
        file: Option<&str>,
    ) -> Result<String, RemoteError> {
        let field = "a redirect (Location header)";
        let Some(raw) = response.header("location") else {
            return Err(self.untrusted(file, field, "", "is missing"));
        };
        resolve_location(current, raw).map_err(|problem| self.untrusted(file, field, raw, &problem))
    }

    /// The token goes only to the Hub's own origin, not to wherever it redirects.
    fn token_for(&self, url: &str) -> Option<&str> {
        self.token
            .as_deref()
            .filter(|_| origin(url).eq_ignore_ascii_case(origin(&self.endpoint)))
    }

    fn classify(&self, error: ureq::Error, request: Request) -> RemoteError {
        let token_set = self.token.is_some();
        match error {
            ureq::Error::Status(status, response) => {
                let reason =
                    reason_for_status(status, response.header("x-error-code"), request, token_set);
                let detail = format!("{}: status code {status}", response.get_url());
                let detail = match response.header("x-error-message") {
                    Some(message) => format!("{detail} (the Hub says: {})", printable(message)),
                    None => detail,
                };
                Failure { reason, detail }.into()
            }
            ureq::Error::Transport(transport) => Failure {
                reason: MissingReason::Network,
                detail: transport.to_string(),
            }
            .into(),
        }
    }

    fn io_failure(&self, error: &std::io::Error, doing: &str) -> Failure {
        Failure {
            reason: if is_transfer_error(error.kind()) {
                MissingReason::Network
            } else {
                MissingReason::Failed
            },
            detail: format!("{doing} from {}: {error}", self.endpoint),
        }
    }

    fn disk_failure(&self, path: &Path, error: &std::io::Error) -> Failure {
        Failure {
            reason: MissingReason::Failed,
            detail: format!("cannot write `{}`: {error}", path.display()),
        }
    }

    fn broke_off(&self, relative: &str, written: u64, total: Option<u64>, why: &str) -> String {
        let of = total.map_or(String::new(), |total| format!(" of {total}"));
        format!("the download of `{relative}` broke off after {written}{of} bytes: {why}")
    }

    fn untrusted(
        &self,
        file: Option<&str>,
        field: &str,
        value: &str,
        problem: &str,
    ) -> RemoteError {
        RemoteError::Untrusted(Box::new(UntrustedResponse {
            repo_id: self.repo_id.clone(),
            revision: self.revision.clone(),
            endpoint: self.endpoint.clone(),
            file: file.map(str::to_string),
            field: field.to_string(),
            value: printable(value),
            problem: problem.to_string(),
        }))
    }
}

const NOT_A_COMMIT: &str = "is not a commit hash (40 lowercase hexadecimal characters)";

/// One try at the body.
enum Attempt {
    /// The transfer broke off: worth resuming.
    Broken(Failure),
    /// Anything else: give up.
    Fatal(RemoteError),
}

/// An ETag as `huggingface_hub` normalises it (weak marker `W/` and quotes stripped),
/// accepted only when it is a plain hash that can name a file in `blobs/`.
pub(crate) fn normalize_etag(raw: &str) -> Result<String, &'static str> {
    let raw = raw.trim();
    let etag = raw.strip_prefix("W/").unwrap_or(raw).trim_matches('"');
    if etag.is_empty() {
        return Err("is empty");
    }
    if etag.contains(['/', '\\']) || etag.contains("..") {
        return Err(
            "could lead out of the cache's blobs folder (it contains a path separator or `..`)",
        );
    }
    if etag.contains('\0') {
        return Err("contains a NUL character");
    }
    if etag.len() > MAX_ETAG_LEN {
        return Err("is too long for a hash (over 128 characters)");
    }
    if !is_safe_etag(etag) {
        return Err("is not a hash (only letters, digits, `-` and `_` are accepted)");
    }
    Ok(etag.to_string())
}

fn is_redirect(status: u16) -> bool {
    matches!(status, 301 | 302 | 303 | 307 | 308)
}

/// The scheme of an absolute URL (`https`, `file`, ...), lowercased; `None` for a
/// relative reference.
fn scheme_of(url: &str) -> Option<String> {
    let (scheme, _) = url.split_once(':')?;
    let mut chars = scheme.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    valid.then(|| scheme.to_ascii_lowercase())
}

/// `scheme://authority` of an absolute http(s) URL.
fn origin(url: &str) -> &str {
    let Some(start) = url.find("://").map(|at| at + 3) else {
        return url;
    };
    let end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |at| start + at);
    &url[..end]
}

/// The absolute URL a `Location` header leads to from `base`, or why it is refused.
fn resolve_location(base: &str, location: &str) -> Result<String, String> {
    let location = location.trim();
    if location.is_empty() {
        return Err("is empty".to_string());
    }
    if location.chars().any(|c| c.is_control() || c == ' ') {
        return Err("contains spaces or control characters".to_string());
    }
    let base_scheme = scheme_of(base).unwrap_or_default();
    if let Some(scheme) = scheme_of(location) {
        if scheme != "http" && scheme != "https" {
            return Err(format!(
                "leads to a `{scheme}:` address; only http and https redirects are followed"
            ));
        }
        if base_scheme == "https" && scheme == "http" {
            return Err(
                "leads from https to plain http; only redirects that keep https are followed"
                    .to_string(),
            );
        }
        if !location[scheme.len() + 1..].starts_with("//") {
            return Err("is not a well-formed http address".to_string());
        }
        return Ok(location.to_string());
    }
    if location.starts_with("//") {
        return Ok(format!("{base_scheme}:{location}"));
    }
    if location.starts_with('/') {
        return Ok(format!("{}{location}", origin(base)));
    }
    // A path relative to the base's folder.
    let path_end = base.find(['?', '#']).unwrap_or(base.len());
    let base = &base[..path_end];
    let folder_end = base.rfind('/').map_or(base.len(), |at| at + 1);
    if folder_end <= origin(base).len() {
        return Ok(format!("{}/{location}", origin(base)));
    }
    Ok(format!("{}{location}", &base[..folder_end]))
}

/// Percent-encodes a repo path (`/` kept when `keep_slash`) or a revision (`/` encoded,
/// as the Hub expects `refs%2Fpr%2F1`).
fn encode(text: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        let plain = byte.is_ascii_alphanumeric()
            || matches!(byte, b'-' | b'_' | b'.' | b'~')
            || (keep_slash && byte == b'/');
        if plain {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The first byte of a `Content-Range: bytes {start}-{end}/{size}` answer.
fn content_range_start(response: &ureq::Response) -> Option<u64> {
    let range = response.header("content-range")?.trim();
    let range = range.strip_prefix("bytes")?.trim_start();
    range.split('-').next()?.trim().parse().ok()
}

/// The Hub names the cause in `X-Error-Code`, as `huggingface_hub` relies on; the status
/// code alone is the fallback (other servers behind HF_ENDPOINT may not send it).
fn reason_for_status(
    status: u16,
    error_code: Option<&str>,
    request: Request,
    token_set: bool,
) -> MissingReason {
    match (error_code, status, request) {
        (Some("GatedRepo"), _, _) => MissingReason::Gated { token_set },
        (Some("RepoNotFound"), _, _) => MissingReason::RepoNotFound { token_set },
        (Some("RevisionNotFound"), _, _) => MissingReason::RevisionNotFound,
        (Some("EntryNotFound"), _, _) => MissingReason::NotInRepo,
        (_, 401, _) => MissingReason::Unauthorized { token_set },
        (_, 403, _) => MissingReason::Gated { token_set },
        (_, 404, Request::Listing) => MissingReason::RepoNotFound { token_set },
        (_, 404, Request::Download) => MissingReason::NotInRepo,
        _ => MissingReason::Failed,
    }
}

fn is_transfer_error(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::TimedOut
            | ErrorKind::WouldBlock
    )
}

/// A one-line progress display on stderr.
struct Progress {
    enabled: bool,
    name: String,
    total: Option<u64>,
    done: u64,
    last: Option<Instant>,
}

impl Progress {
    fn new(enabled: bool, name: &str, total: Option<u64>) -> Self {
        Self {
            enabled,
            name: name.to_string(),
            total,
            done: 0,
            last: None,
        }
    }

    fn restart(&mut self) {
        self.done = 0;
    }

    fn advance(&mut self, count: u64) {
        self.done += count;
        if !self.enabled
            || self
                .last
                .is_some_and(|last| last.elapsed() < Duration::from_millis(250))
        {
            return;
        }
        self.last = Some(Instant::now());
        self.draw();
    }

    fn draw(&self) {
        let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
        let line = match self.total {
            Some(total) if total > 0 => format!(
                "{}: {:.1}/{:.1} MiB ({:.0}%)",
                self.name,
                mib(self.done),
                mib(total),
                100.0 * self.done as f64 / total as f64
            ),
            _ => format!("{}: {:.1} MiB", self.name, mib(self.done)),
        };
        eprint!("\r{line}\x1b[K");
    }

    fn finish(&mut self) {
        if self.enabled && self.last.is_some() {
            self.draw();
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_are_normalised_and_checked() {
        assert_eq!(normalize_etag("\"abc123\"").unwrap(), "abc123");
        assert_eq!(normalize_etag("W/\"abc-1_2\"").unwrap(), "abc-1_2");
        assert_eq!(normalize_etag(&"a".repeat(64)).unwrap(), "a".repeat(64));
        for bad in [
            "", "\"\"", "../../x", "a/b", "a\\b", "..", "a\0b", "a.b", "a b",
        ] {
            assert!(normalize_etag(bad).is_err(), "{bad:?}");
        }
        assert!(normalize_etag(&"a".repeat(129)).is_err());
    }

    #[test]
    fn locations_resolve_and_foreign_schemes_are_refused() {
        let base = "http://h:1/o/n/resolve/c/a/b.json?x=1";
        assert_eq!(resolve_location(base, "/p/q").unwrap(), "http://h:1/p/q");
        assert_eq!(resolve_location(base, "//cdn/x").unwrap(), "http://cdn/x");
        assert_eq!(
            resolve_location(base, "c.json").unwrap(),
            "http://h:1/o/n/resolve/c/a/c.json"
        );
        assert_eq!(
            resolve_location(base, "https://cdn/x").unwrap(),
            "https://cdn/x"
        );
        assert_eq!(resolve_location("http://h", "x").unwrap(), "http://h/x");
        for bad in [
            "file:///etc/passwd",
            "ftp://h/x",
            "data:text/plain,hi",
            "gopher://h",
            "http:x",
        ] {
            assert!(resolve_location(base, bad).is_err(), "{bad}");
        }
        assert!(resolve_location("https://h/x", "http://h/y").is_err());
    }

    #[test]
    fn origins_and_encoding() {
        assert_eq!(
            origin("https://huggingface.co/a/b"),
            "https://huggingface.co"
        );
        assert_eq!(origin("http://127.0.0.1:9"), "http://127.0.0.1:9");
        assert_eq!(encode("refs/pr/1", false), "refs%2Fpr%2F1");
        assert_eq!(encode("a b/c#d.json", true), "a%20b/c%23d.json");
    }
}
