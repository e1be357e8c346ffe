//! Where the Hub cache lives, which token to send, and whether to go online.
//!
//! The defaults follow Python's `huggingface_hub`, so a model downloaded with
//! `huggingface-cli download` (or by diffusers) is found without downloading it again.

use std::fmt;
use std::path::{Path, PathBuf};

/// The public Hugging Face Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Download attempts after the first one for a file body; each resumes (HTTP `Range`) from
/// where the broken transfer stopped, so a dropped connection on a multi-gigabyte shard does
/// not restart it.
const DEFAULT_DOWNLOAD_RETRIES: usize = 3;

/// How to reach the Hub and where its cache is.
///
/// Build one with [`HubOptions::from_env`] for the user's setup, or with
/// [`HubOptions::new`] plus the `with_*` methods when nothing should come from the
/// environment (tests, embedding applications).
#[derive(Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// The hub cache folder, holding `models--owner--name/{blobs,refs,snapshots}`.
    pub cache_dir: PathBuf,
    /// Access token for gated and private repos.
    pub token: Option<String>,
    /// Use only what is already in the cache; never touch the network.
    pub offline: bool,
    /// Base URL of the Hub, without a trailing slash.
    pub endpoint: String,
    /// Show a progress bar while downloading.
    pub progress: bool,
    /// How many times a failed file download is resumed before giving up.
    pub download_retries: usize,
}

impl HubOptions {
    /// Options that read nothing from the environment: the given cache, no token,
    /// online, the public Hub, no progress bar.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            token: None,
            offline: false,
            endpoint: DEFAULT_ENDPOINT.to_string(),
            progress: false,
            download_retries: DEFAULT_DOWNLOAD_RETRIES,
        }
    }

    /// Options from the process environment, as `huggingface_hub` reads them:
    ///
    /// - cache: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`,
    ///   else `~/.cache/huggingface/hub`;
    /// - token: `HF_TOKEN` (or the older `HUGGING_FACE_HUB_TOKEN`), else the token file
    ///   `HF_TOKEN_PATH`, else `HF_HOME/token`, else `~/.cache/huggingface/token`;
    /// - offline: `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) set to 1/true/yes/on;
    /// - endpoint: `HF_ENDPOINT`;
    /// - progress bars unless `HF_HUB_DISABLE_PROGRESS_BARS` is true.
    pub fn from_env() -> Self {
        Self::from_env_with(|name| std::env::var(name).ok())
    }

    /// Like [`HubOptions::from_env`], reading variables through `lookup` instead of
    /// the process environment (the token file is still read from disk).
    pub fn from_env_with(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let env = Env { lookup };
        let home = env.home_dir();
        let expand = |value: String| expand_tilde(&value, &home);

        let hf_home = env
            .get("HF_HOME")
            .map(expand)
            .unwrap_or_else(|| xdg_cache_dir(&env, &home).join("huggingface"));
        let cache_dir = env
            .get("HF_HUB_CACHE")
            .or_else(|| env.get("HUGGINGFACE_HUB_CACHE"))
            .map(expand)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token_path = env
            .get("HF_TOKEN_PATH")
            .map(expand)
            .unwrap_or_else(|| hf_home.join("token"));
        let token = env
            .get("HF_TOKEN")
            .or_else(|| env.get("HUGGING_FACE_HUB_TOKEN"))
            .and_then(|token| clean_token(&token))
            .or_else(|| read_token_file(&token_path));
        let offline = env
            .get("HF_HUB_OFFLINE")
            .or_else(|| env.get("TRANSFORMERS_OFFLINE"))
            .is_some_and(|value| is_true(&value));
        let endpoint = env
            .get("HF_ENDPOINT")
            .map(|url| url.trim_end_matches('/').to_string())
            .filter(|url| !url.is_empty())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let progress = !env
            .get("HF_HUB_DISABLE_PROGRESS_BARS")
            .is_some_and(|value| is_true(&value));

        Self {
            cache_dir,
            token,
            offline,
            endpoint,
            progress,
            download_retries: DEFAULT_DOWNLOAD_RETRIES,
        }
    }

    /// Sets the hub cache folder.
    pub fn with_cache_dir(mut self, cache_dir: impl Into<PathBuf>) -> Self {
        self.cache_dir = cache_dir.into();
        self
    }

    /// Sets (or clears) the access token.
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token.and_then(|token| clean_token(&token));
        self
    }

    /// Turns offline mode on or off.
    pub fn with_offline(mut self, offline: bool) -> Self {
        self.offline = offline;
        self
    }

    /// Sets the Hub base URL (a trailing slash is dropped).
    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = endpoint.into().trim_end_matches('/').to_string();
        self
    }

    /// Turns the download progress bar on or off.
    pub fn with_progress(mut self, progress: bool) -> Self {
        self.progress = progress;
        self
    }

    /// Sets how many times a failed download is resumed.
    pub fn with_download_retries(mut self, retries: usize) -> Self {
        self.download_retries = retries;
        self
    }
}

// The token is a secret: keep it out of logs and panic messages.
impl fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubOptions")
            .field("cache_dir", &self.cache_dir)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("offline", &self.offline)
            .field("endpoint", &self.endpoint)
            .field("progress", &self.progress)
            .field("download_retries", &self.download_retries)
            .finish()
    }
}

/// Environment lookup where an empty variable counts as unset.
struct Env<F> {
    lookup: F,
}

impl<F: Fn(&str) -> Option<String>> Env<F> {
    fn get(&self, name: &str) -> Option<String> {
        (self.lookup)(name).filter(|value| !value.is_empty())
    }

    /// The user's home; without one, the temp folder keeps the cache somewhere writable.
    fn home_dir(&self) -> PathBuf {
        self.get("HOME")
            .or_else(|| self.get("USERPROFILE"))
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir)
    }
}

fn xdg_cache_dir<F: Fn(&str) -> Option<String>>(env: &Env<F>, home: &Path) -> PathBuf {
    env.get("XDG_CACHE_HOME")
        .map(|dir| expand_tilde(&dir, home))
        .unwrap_or_else(|| home.join(".cache"))
}

/// `~` and `~/rest` mean the home folder, as Python's `os.path.expanduser` does.
fn expand_tilde(value: &str, home: &Path) -> PathBuf {
    if value == "~" {
        return home.to_path_buf();
    }
    match value
        .strip_prefix("~/")
        .or_else(|| value.strip_prefix("~\\"))
    {
        Some(rest) => home.join(rest),
        None => PathBuf::from(value),
    }
}

/// `huggingface_hub` accepts 1, ON, YES and TRUE in any case.
fn is_true(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_uppercase().as_str(),
        "1" | "ON" | "YES" | "TRUE"
    )
}

fn clean_token(token: &str) -> Option<String> {
    let token = token.trim();
    (!token.is_empty()).then(|| token.to_string())
}

/// A missing or unreadable token file just means "no token", as in `huggingface_hub`.
fn read_token_file(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|content| clean_token(&content))
}
