//! Telling a local model folder from a Hub repo id.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::{HubError, Result};

/// The branch used when a repo id names no revision.
pub const DEFAULT_REVISION: &str = "main";

/// Forces the Hub reading of a spec, even when a folder of that name exists.
const HUB_PREFIX: &str = "hf:";

/// The Hub refuses longer repo ids.
const MAX_REPO_ID_LEN: usize = 96;

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A folder on disk in diffusers layout.
    Local(PathBuf),
    /// A Hugging Face Hub model repo at a branch, tag or commit.
    Hub { repo_id: String, revision: String },
}

impl ModelSource {
    /// Reads a model spec:
    ///
    /// - an existing folder → [`ModelSource::Local`];
    /// - `owner/name` or `owner/name@revision` (revision defaults to `main`) →
    ///   [`ModelSource::Hub`]; the prefix `hf:` forces this reading.
    ///
    /// Anything else is an error that says the path does not exist and what a repo
    /// id looks like.
    pub fn parse(spec: &str) -> Result<Self> {
        if let Some(repo) = spec.strip_prefix(HUB_PREFIX) {
            return parse_hub(repo).map_err(|reason| HubError::InvalidSpec {
                spec: spec.to_string(),
                reason: format!("after `{HUB_PREFIX}` a Hub repo id is expected: {reason}"),
            });
        }
        if spec.trim().is_empty() {
            return Err(HubError::InvalidSpec {
                spec: spec.to_string(),
                reason: "it is empty".to_string(),
            });
        }

        let path = Path::new(spec);
        if path.is_dir() {
            return Ok(Self::Local(path.to_path_buf()));
        }
        if path.exists() {
            return Err(HubError::NotAFolder {
                path: path.to_path_buf(),
            });
        }
        if looks_like_path(spec) {
            return Err(HubError::PathNotFound {
                path: absolute(path),
            });
        }
        parse_hub(spec).map_err(|reason| HubError::InvalidSpec {
            spec: spec.to_string(),
            reason: format!(
                "no file or folder exists at that path, and it is not a Hub repo id ({reason})"
            ),
        })
    }
}

impl FromStr for ModelSource {
    type Err = HubError;

    fn from_str(spec: &str) -> Result<Self> {
        Self::parse(spec)
    }
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Local(path) => write!(f, "{}", path.display()),
            Self::Hub { repo_id, revision } => write!(f, "{repo_id}@{revision}"),
        }
    }
}

/// The full path for messages; the path as given when the working folder is unknown.
pub(crate) fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Specs that can only be meant as paths; for these "does not exist" is the useful error.
fn looks_like_path(spec: &str) -> bool {
    let bytes = spec.as_bytes();
    let windows_drive = bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':';
    spec.starts_with(['/', '.', '~', '\\']) || spec.contains('\\') || windows_drive
}

/// Checks a Hub source built by hand (its fields are public) as `parse` would.
pub(crate) fn check_hub(repo_id: &str, revision: &str) -> Result<()> {
    validate_repo_id(repo_id)
        .and_then(|()| validate_revision(revision))
        .map_err(|reason| HubError::InvalidSpec {
            spec: format!("{repo_id}@{revision}"),
            reason,
        })
}

fn parse_hub(spec: &str) -> std::result::Result<ModelSource, String> {
    let (repo_id, revision) = match spec.split_once('@') {
        Some((repo_id, revision)) => (repo_id, revision),
        None => (spec, DEFAULT_REVISION),
    };
    validate_repo_id(repo_id)?;
    validate_revision(revision)?;
    Ok(ModelSource::Hub {
        repo_id: repo_id.to_string(),
        revision: revision.to_string(),
    })
}

/// The Hub's own rules (`huggingface_hub.utils.validate_repo_id`), restricted to
/// `owner/name` since models are always addressed with their owner here.
fn validate_repo_id(repo_id: &str) -> std::result::Result<(), String> {
    let Some((owner, name)) = repo_id.split_once('/') else {
        return Err(format!("`{repo_id}` has no `/` between owner and name"));
    };
    if name.contains('/') {
        return Err(format!("`{repo_id}` has more than one `/`"));
    }
    if repo_id.len() > MAX_REPO_ID_LEN {
        return Err(format!(
            "`{repo_id}` is longer than {MAX_REPO_ID_LEN} characters"
        ));
    }
    if repo_id.contains("--") || repo_id.contains("..") {
        return Err(format!("`{repo_id}` contains `--` or `..`"));
    }
    for part in [owner, name] {
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
        let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        if part.is_empty()
            || !part.chars().all(allowed)
            || !edge_ok(part.chars().next())
            || !edge_ok(part.chars().last())
        {
            return Err(format!(
                "`{part}` is not a valid owner or repo name: use letters, digits, `-`, `_` \
                 and `.`, starting and ending with a letter or digit"
            ));
        }
    }
    Ok(())
}

/// Revisions are branch or tag names (which may contain `/`, e.g. `refs/pr/1`) or commit
/// hashes; they also name a file under the cache's `refs/`, so nothing may climb out.
fn validate_revision(revision: &str) -> std::result::Result<(), String> {
    let climbs_out = revision
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..");
    if revision.is_empty()
        || climbs_out
        || revision.contains(['\\', '@'])
        || revision
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "`{revision}` is not a valid revision (a branch, tag or commit hash after `@`)"
        ));
    }
    Ok(())
}
