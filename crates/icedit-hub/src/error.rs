//! Errors worded for the person running the program: what is missing, where it was
//! looked for, and what to do about it.

use std::fmt;
use std::path::PathBuf;

/// Result with [`HubError`] as the default error.
pub type Result<T, E = HubError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The spec is neither an existing folder nor a Hub repo id.
    #[error(
        "invalid model `{spec}`: {reason}. Pass an existing folder in diffusers layout, \
         or a Hugging Face Hub repo id such as `owner/name` or `owner/name@revision` \
         (e.g. `black-forest-labs/FLUX.1-Fill-dev`)"
    )]
    InvalidSpec { spec: String, reason: String },

    /// The spec is clearly a path, and nothing exists there.
    #[error(
        "model folder `{}` does not exist. Pass an existing folder in diffusers layout, \
         or a Hugging Face Hub repo id such as `owner/name` or `owner/name@revision` \
         (e.g. `black-forest-labs/FLUX.1-Fill-dev`)",
        path.display()
    )]
    PathNotFound { path: PathBuf },

    /// The spec names a file where a model folder was expected.
    #[error(
        "model path `{}` is a file; pass the folder that holds the model (diffusers layout) \
         or a Hugging Face Hub repo id",
        path.display()
    )]
    NotAFolder { path: PathBuf },

    /// A file name inside a model is malformed (absolute, `..`, empty parts).
    #[error("invalid file name `{name}` inside a model: {reason}")]
    InvalidFileName { name: String, reason: &'static str },

    /// Files missing from a local model folder.
    #[error("{}", describe_missing_local(dir, paths, note.as_deref()))]
    MissingLocalFiles {
        dir: PathBuf,
        paths: Vec<PathBuf>,
        /// Context from the caller, e.g. which alternative layouts were tried.
        note: Option<String>,
    },

    /// Files (or the file listing) of a Hub repo that are neither cached nor obtainable.
    #[error(transparent)]
    MissingFiles(Box<MissingFiles>),

    /// A `*.safetensors.index.json` that cannot be used.
    #[error("invalid safetensors index `{}`: {reason}", path.display())]
    InvalidIndex { path: PathBuf, reason: String },

    #[error("cannot read `{}`: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The HTTP client could not be set up.
    #[error("cannot set up the Hugging Face Hub client: {0}")]
    Client(String),

    /// The Hub (or whatever answers at `HF_ENDPOINT`) sent something that would have
    /// put a file outside the cache, mixed commits, or stored a wrong file; it was refused
    /// and nothing was kept for that file.
    #[error(transparent)]
    UntrustedResponse(Box<UntrustedResponse>),
}

/// A response from the Hub that was refused: which repo and file, what carried the bad
/// value, the value (escaped and shortened for display), and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UntrustedResponse {
    pub repo_id: String,
    pub revision: String,
    pub endpoint: String,
    /// The file being downloaded; `None` when the repo's info (commit, listing) was asked.
    pub file: Option<String>,
    /// What carried the value, e.g. `the ETag header`, `the X-Repo-Commit header`,
    /// `a redirect (Location header)`.
    pub field: String,
    /// The offending value, escaped and shortened so it is safe to print.
    pub value: String,
    /// What is wrong with it, e.g. `contains `..` or a path separator`.
    pub problem: String,
}

impl From<UntrustedResponse> for HubError {
    fn from(untrusted: UntrustedResponse) -> Self {
        Self::UntrustedResponse(Box::new(untrusted))
    }
}

impl std::error::Error for UntrustedResponse {}

impl fmt::Display for UntrustedResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match &self.file {
            Some(file) => format!("`{file}` of Hugging Face repo"),
            None => "the info of Hugging Face repo".to_string(),
        };
        writeln!(
            f,
            "refused the answer of the Hub at {} for {what} {}@{}: {} `{}` {}",
            self.endpoint, self.repo_id, self.revision, self.field, self.value, self.problem
        )?;
        writeln!(
            f,
            "nothing was written outside the cache, and nothing was kept for this file"
        )?;
        write!(
            f,
            "to fix:\n  - a genuine Hugging Face Hub never answers this: check HF_ENDPOINT ({}) \
             and use an https:// address, so nobody on the way can alter the answers",
            self.endpoint
        )?;
        write!(
            f,
            "\n  - or pass a local folder in diffusers layout instead of the repo id"
        )
    }
}

/// `value` made safe to print in one line: control characters and quotes escaped, and
/// at most `MAX` characters of it.
pub(crate) fn printable(value: &str) -> String {
    const MAX: usize = 80;
    let escaped: String = value.escape_debug().collect();
    if escaped.chars().count() <= MAX {
        escaped
    } else {
        let cut: String = escaped.chars().take(MAX).collect();
        format!("{cut}... ({} bytes in all)", value.len())
    }
}

fn describe_missing_local(dir: &std::path::Path, paths: &[PathBuf], note: Option<&str>) -> String {
    let mut text = format!(
        "the model folder `{}` lacks {}:",
        dir.display(),
        plural(paths.len(), "file")
    );
    for path in paths {
        text.push_str(&format!("\n  - {}", path.display()));
    }
    if let Some(note) = note {
        text.push_str(&format!("\nnote: {note}"));
    }
    text.push_str(
        "\nThe folder must be in diffusers layout (as downloaded from the Hub); \
         or pass a Hub repo id such as `black-forest-labs/FLUX.1-Fill-dev` instead.",
    );
    text
}

/// Why files of a Hub repo could not be had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MissingReason {
    /// Offline mode is on and the files are not cached.
    Offline,
    /// The Hub could not be reached (DNS, connection, TLS, dropped transfer).
    Network,
    /// HTTP 401 without a more specific cause: no token, or a rejected one.
    Unauthorized { token_set: bool },
    /// The repo is gated and this account (if any) has not been granted access.
    Gated { token_set: bool },
    /// The Hub does not know the repo, or it is private and the token cannot see it.
    RepoNotFound { token_set: bool },
    /// The revision is not a branch, tag or commit of the repo.
    RevisionNotFound,
    /// The repo exists but has no such files at this revision.
    NotInRepo,
    /// Anything else: server errors, disk errors, another process holding the download lock.
    Failed,
}

/// Everything needed to act on files that a Hub repo could not provide.
#[derive(Debug, Clone)]
pub struct MissingFiles {
    pub repo_id: String,
    pub revision: String,
    /// The repo's folder in the cache, which was searched.
    pub cache_dir: PathBuf,
    pub endpoint: String,
    /// The files that could not be had; empty when the repo's file listing was wanted.
    pub files: Vec<String>,
    pub reason: MissingReason,
    /// The underlying error, for the curious.
    pub detail: Option<String>,
    /// Context from the caller, e.g. which alternative layouts were tried.
    pub note: Option<String>,
}

impl From<MissingFiles> for HubError {
    fn from(missing: MissingFiles) -> Self {
        Self::MissingFiles(Box::new(missing))
    }
}

impl std::error::Error for MissingFiles {}

impl fmt::Display for MissingFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let repo = format!("{}@{}", self.repo_id, self.revision);
        if self.files.is_empty() {
            writeln!(f, "cannot list the files of Hugging Face repo {repo}")?;
        } else {
            writeln!(
                f,
                "cannot get {} of Hugging Face repo {repo}:",
                plural(self.files.len(), "file")
            )?;
            for file in &self.files {
                writeln!(f, "  - {file}")?;
            }
        }
        writeln!(f, "reason: {}", self.reason_text())?;
        writeln!(f, "cache searched: {}", self.cache_dir.display())?;
        if let Some(note) = &self.note {
            writeln!(f, "note: {note}")?;
        }
        if let Some(detail) = &self.detail {
            writeln!(f, "details: {detail}")?;
        }
        write!(f, "to fix:")?;
        for fix in self.fixes() {
            write!(f, "\n  - {fix}")?;
        }
        Ok(())
    }
}

impl MissingFiles {
    fn model_page(&self) -> String {
        format!("{}/{}", self.endpoint, self.repo_id)
    }

    fn reason_text(&self) -> String {
        let token_state = |token_set: bool| {
            if token_set {
                "the token in use was not accepted"
            } else {
                "no token is set"
            }
        };
        match &self.reason {
            MissingReason::Offline => {
                "offline mode is on (HF_HUB_OFFLINE) and they are not in the local cache".into()
            }
            MissingReason::Network => {
                format!("the connection to the Hub at {} failed", self.endpoint)
            }
            MissingReason::Unauthorized { token_set } => format!(
                "the Hub refused access (401 Unauthorized): {}",
                token_state(*token_set)
            ),
            MissingReason::Gated { token_set } => format!(
                "the repo is gated and access has not been granted: {}",
                if *token_set {
                    "the token's account has not accepted the license"
                } else {
                    "no token is set"
                }
            ),
            MissingReason::RepoNotFound { token_set } => format!(
                "the Hub knows no repo `{}` that is visible {}",
                self.repo_id,
                if *token_set {
                    "to this token"
                } else {
                    "without a token"
                }
            ),
            MissingReason::RevisionNotFound => {
                format!("the repo has no branch, tag or commit `{}`", self.revision)
            }
            MissingReason::NotInRepo => format!(
                "the repo does not contain them at revision `{}`",
                self.revision
            ),
            MissingReason::Failed => "the download failed".into(),
        }
    }

    fn fixes(&self) -> Vec<String> {
        let accept_and_authenticate = format!(
            "accept the license at {} while logged in, and set HF_TOKEN to a token of that \
             account (or run `huggingface-cli login`)",
            self.model_page()
        );
        let token_and_license =
            format!("for gated repos (such as FLUX.1-dev models): {accept_and_authenticate}");
        let mut fixes = Vec::new();
        match &self.reason {
            MissingReason::Offline => {
                fixes.push("unset HF_HUB_OFFLINE so missing files can be downloaded".to_string());
                fixes.push(token_and_license);
            }
            MissingReason::Network => {
                fixes.push(format!(
                    "check the network connection and the Hub address {} (HF_ENDPOINT)",
                    self.endpoint
                ));
                fixes.push(token_and_license);
            }
            MissingReason::Unauthorized { .. } | MissingReason::Gated { .. } => {
                fixes.push(accept_and_authenticate);
            }
            MissingReason::RepoNotFound { .. } => {
                fixes.push(format!("check the repo id `{}`", self.repo_id));
                fixes.push(format!(
                    "if the repo is private or gated: {accept_and_authenticate}"
                ));
            }
            MissingReason::RevisionNotFound | MissingReason::NotInRepo => {
                fixes.push(format!(
                    "check the repo id `{}` and the revision `{}` (a repo in diffusers layout \
                     is expected)",
                    self.repo_id, self.revision
                ));
            }
            MissingReason::Failed => {
                fixes.push("try again; the details above say what failed".to_string());
            }
        }
        if !matches!(
            self.reason,
            MissingReason::RevisionNotFound | MissingReason::NotInRepo
        ) {
            fixes.push(format!(
                "or download ahead of time: {}",
                self.download_command()
            ));
        }
        fixes.push(
            "or pass a local folder in diffusers layout (model_index.json, transformer/, vae/, \
             ...) instead of the repo id"
                .to_string(),
        );
        fixes
    }

    /// The `huggingface-cli` command that puts exactly these files into this cache.
    fn download_command(&self) -> String {
        let mut command = format!("huggingface-cli download {}", self.repo_id);
        if self.revision != crate::DEFAULT_REVISION {
            command.push_str(&format!(" --revision {}", self.revision));
        }
        for file in &self.files {
            command.push(' ');
            command.push_str(&shell_quote(file));
        }
        // The repo folder's parent is the cache dir that huggingface-cli should fill.
        if let Some(cache_dir) = self.cache_dir.parent() {
            let cache_dir = cache_dir.display().to_string();
            command.push_str(&format!(" --cache-dir {}", shell_quote(&cache_dir)));
        }
        command
    }
}

/// Quotes a word for a POSIX shell when it needs it, so the command can be pasted.
fn shell_quote(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:@+,".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

fn plural(count: usize, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}
