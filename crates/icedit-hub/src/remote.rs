//! The online side of a Hub repo, through hf-hub's blocking client.
//!
//! hf-hub downloads into `blobs/{etag}.part`, renames it to `blobs/{etag}` only once the
//! whole body has arrived (ureq reports a short body as an error), then links it into
//! `snapshots/{commit}/` and writes `refs/{revision}`. So a snapshot never holds a
//! partial file; what a failed download leaves behind is the `.part` file, kept by
//! hf-hub for resuming. We delete the ones a failed call of ours created, so no partial
//! data stays in the cache. `.part` files that were already there (an interrupted
//! earlier run) are left for hf-hub to resume. (Should another process start a download
//! into the same repo folder during our failed call, its new `.part` goes too; it then
//! fails cleanly on its rename and can be rerun: no partial file is ever taken as whole.)
//! hf-hub also leaves empty `blobs/{etag}.lock` files; those hold no data, and deleting
//! one could break another process's lock, so they stay.

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

use crate::cache::CachedRepo;
use crate::error::{HubError, MissingReason, Result};
use crate::options::HubOptions;

/// Why one request to the Hub failed.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub(crate) reason: MissingReason,
    pub(crate) detail: String,
}

#[derive(Clone, Copy)]
enum Request {
    Listing,
    Download,
}

pub(crate) struct Remote {
    repo: ApiRepo,
    token_set: bool,
    /// The repo's file names, fetched at most once per handle.
    listing: Mutex<Option<Arc<BTreeSet<String>>>>,
}

impl Remote {
    pub(crate) fn new(options: &HubOptions, repo_id: &str, revision: &str) -> Result<Self> {
        // `from_cache` rather than `new`: hf-hub's default cache panics without a home folder.
        let api = ApiBuilder::from_cache(Cache::new(options.cache_dir.clone()))
            .with_token(options.token.clone())
            .with_endpoint(options.endpoint.clone())
            .with_progress(options.progress)
            .with_retries(options.download_retries)
            .build()
            .map_err(|error| HubError::Client(error.to_string()))?;
        let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
        Ok(Self {
            repo: api.repo(repo),
            token_set: options.token.is_some(),
            listing: Mutex::new(None),
        })
    }

    /// Every file in the repo at the revision (the API's `siblings`).
    pub(crate) fn listing(&self) -> Result<Arc<BTreeSet<String>>, Failure> {
        let mut memo = self.listing.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(listing) = memo.as_ref() {
            return Ok(Arc::clone(listing));
        }
        let info = self
            .repo
            .info()
            .map_err(|error| self.classify(&error, Request::Listing))?;
        let listing: Arc<BTreeSet<String>> = Arc::new(
            info.siblings
                .into_iter()
                .map(|sibling| sibling.rfilename)
                .collect(),
        );
        *memo = Some(Arc::clone(&listing));
        Ok(listing)
    }

    /// Downloads `relative` into the cache and returns its snapshot path.
    pub(crate) fn download(&self, relative: &str, cache: &CachedRepo) -> Result<PathBuf, Failure> {
        let partial_before = cache.partial_downloads();
        self.repo.download(relative).map_err(|error| {
            for partial in cache.partial_downloads().difference(&partial_before) {
                // Best effort: a leftover we cannot delete is still never used as a file.
                let _ = std::fs::remove_file(partial);
            }
            self.classify(&error, Request::Download)
        })
    }

    fn classify(&self, error: &ApiError, request: Request) -> Failure {
        Failure {
            reason: reason_for(error, request, self.token_set),
            detail: detail_for(error),
        }
    }
}

fn reason_for(error: &ApiError, request: Request, token_set: bool) -> MissingReason {
    match error {
        ApiError::RequestError(inner) => match inner.as_ref() {
            ureq::Error::Status(status, response) => {
                reason_for_status(*status, response.header("x-error-code"), request, token_set)
            }
            ureq::Error::Transport(_) => MissingReason::Network,
        },
        ApiError::TooManyRetries(last) => reason_for(last, request, token_set),
        // Copying the body reports network trouble as I/O errors too.
        ApiError::IoError(io) if is_transfer_error(io.kind()) => MissingReason::Network,
        _ => MissingReason::Failed,
    }
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
    )
}

/// The error text, plus the Hub's own explanation when it sent one.
fn detail_for(error: &ApiError) -> String {
    let server_message = match error {
        ApiError::RequestError(inner) => match inner.as_ref() {
            ureq::Error::Status(_, response) => response.header("x-error-message"),
            ureq::Error::Transport(_) => None,
        },
        _ => None,
    };
    match server_message {
        Some(message) => format!("{error} (the Hub says: {message})"),
        None => error.to_string(),
    }
}
