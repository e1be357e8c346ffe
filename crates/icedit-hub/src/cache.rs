//! Reading and writing the standard Hugging Face cache layout, shared with Python's
//! `huggingface_hub`:
//!
//! ```text
//! {cache_dir}/models--{owner}--{name}/
//!     blobs/{etag}                       file contents
//!     refs/{revision}                    a commit hash (branch or tag -> commit)
//!     snapshots/{commit}/{file path}     relative symlinks (or copies) of the blobs
//! ```
//!
//! Every name that comes from a server (ETag, commit) is validated by the caller before it
//! reaches these functions; they check again, so nothing here can name a path outside the
//! repo's folder.

use std::path::{Path, PathBuf};

use crate::listing::list_files;

/// One repo's folder in the cache, at one revision.
#[derive(Debug, Clone)]
pub(crate) struct CachedRepo {
    dir: PathBuf,
    revision: String,
}

impl CachedRepo {
    pub(crate) fn new(cache_dir: &Path, repo_id: &str, revision: &str) -> Self {
        Self {
            dir: cache_dir.join(folder_name(repo_id)),
            revision: revision.to_string(),
        }
    }

    /// `{cache_dir}/models--owner--name`, the folder searched for this repo.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The commit the revision stands for in the cache: a commit hash stands for
    /// itself, a branch or tag is looked up in `refs/`.
    pub(crate) fn commit(&self) -> Option<String> {
        let from_ref = std::fs::read_to_string(self.dir.join("refs").join(&self.revision))
            .ok()
            .map(|content| content.trim().to_string())
            .filter(|commit| is_commit_hash(commit));
        from_ref.or_else(|| is_commit_hash(&self.revision).then(|| self.revision.clone()))
    }

    /// Points `refs/{revision}` at `commit`, unless the revision is that commit itself
    /// (as `huggingface_hub` does). Leaves the file alone when it already says so.
    pub(crate) fn set_ref(&self, commit: &str) -> std::io::Result<()> {
        if !is_commit_hash(commit) {
            return Err(invalid_name("commit", commit));
        }
        if self.revision == commit {
            return Ok(());
        }
        let path = self.dir.join("refs").join(&self.revision);
        let current = std::fs::read_to_string(&path).ok();
        if current.as_deref().map(str::trim) == Some(commit) {
            return Ok(());
        }
        std::fs::create_dir_all(path.parent().expect("inside refs/"))?;
        std::fs::write(&path, commit)
    }

    fn snapshot_dir(&self, commit: &str) -> Option<PathBuf> {
        if !is_commit_hash(commit) {
            return None;
        }
        let dir = self.dir.join("snapshots").join(commit);
        dir.is_dir().then_some(dir)
    }

    /// Whether a snapshot folder exists for `commit`.
    pub(crate) fn has_snapshot(&self, commit: &str) -> bool {
        self.snapshot_dir(commit).is_some()
    }

    /// The cached copy of `relative` in snapshot `commit`; a dangling link (blob deleted)
    /// counts as absent.
    pub(crate) fn file(&self, commit: &str, relative: &str) -> Option<PathBuf> {
        if !is_safe_relative(relative) {
            return None;
        }
        let path = self.snapshot_dir(commit)?.join(relative);
        path.is_file().then_some(path)
    }

    /// The files of snapshot `commit`, or `None` when it is not cached.
    pub(crate) fn list(&self, commit: &str) -> Option<Vec<String>> {
        list_files(&self.snapshot_dir(commit)?).ok()
    }

    /// `blobs/{etag}`, where the contents with this ETag are (or will be) stored.
    pub(crate) fn blob_path(&self, etag: &str) -> std::io::Result<PathBuf> {
        if !is_safe_etag(etag) {
            return Err(invalid_name("blob", etag));
        }
        Ok(self.dir.join("blobs").join(etag))
    }

    /// Makes `snapshots/{commit}/{relative}` a relative symlink to `blobs/{etag}` (a copy
    /// where symlinks cannot be made), replacing whatever entry was there; returns its path.
    pub(crate) fn link(
        &self,
        commit: &str,
        relative: &str,
        etag: &str,
    ) -> std::io::Result<PathBuf> {
        if !is_commit_hash(commit) {
            return Err(invalid_name("commit", commit));
        }
        if !is_safe_relative(relative) {
            return Err(invalid_name("file", relative));
        }
        let blob = self.blob_path(etag)?;
        let entry = self.dir.join("snapshots").join(commit).join(relative);
        std::fs::create_dir_all(entry.parent().expect("inside the snapshot"))?;
        // A stale entry (an older download, a link to a deleted blob) is replaced; a
        // folder in the way is an error from `remove_file`, never removed.
        if std::fs::symlink_metadata(&entry).is_ok() {
            std::fs::remove_file(&entry)?;
        }
        // From the entry's folder up to the repo folder: one level per path component.
        let depth = relative.split('/').count() + 1;
        let target = Path::new(&"../".repeat(depth)).join("blobs").join(etag);
        if symlink(&target, &entry).is_err() {
            std::fs::copy(&blob, &entry)?;
        }
        Ok(entry)
    }
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(windows)]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::windows::fs::symlink_file(target, link)
}

#[cfg(not(any(unix, windows)))]
fn symlink(_target: &Path, _link: &Path) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

fn invalid_name(what: &str, name: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("refusing the {what} name {name:?} inside the cache"),
    )
}

/// `owner/name` -> `models--owner--name`, as `huggingface_hub` names it.
fn folder_name(repo_id: &str) -> String {
    format!("models--{}", repo_id.replace('/', "--"))
}

/// A full git commit hash, which the cache uses as the snapshot folder name.
pub(crate) fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40
        && revision
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Longest ETag taken as a blob name (a sha256 is 64 characters).
pub(crate) const MAX_ETAG_LEN: usize = 128;

/// A normalised ETag usable as a file name in `blobs/`: a hash, nothing that could
/// name another folder.
pub(crate) fn is_safe_etag(etag: &str) -> bool {
    !etag.is_empty()
        && etag.len() <= MAX_ETAG_LEN
        && etag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A repo path that stays inside a snapshot folder: relative, `/`-separated, no empty,
/// `.` or `..` parts, no backslash or NUL.
pub(crate) fn is_safe_relative(relative: &str) -> bool {
    !relative.is_empty()
        && !relative.contains(['\\', '\0'])
        && !relative.starts_with('/')
        && !Path::new(relative).is_absolute()
        && relative
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

/// Copies a local folder into the cache as `repo_id` at revision `main` (blobs, `refs/main`,
/// relative snapshot links), as a download would have left it; returns the snapshot folder.
/// Lets a machine without network use a model or adapter by its repo id, and lets tests exercise
/// the cache code path. The commit name is a placeholder derived from the repo id.
pub fn import_folder(cache_dir: &Path, repo_id: &str, folder: &Path) -> std::io::Result<PathBuf> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    repo_id.hash(&mut hasher);
    let commit = format!("{:016x}{:024x}", hasher.finish(), 0);
    let repo_dir = cache_dir.join(folder_name(repo_id));
    let snapshot = repo_dir.join("snapshots").join(&commit);
    std::fs::create_dir_all(repo_dir.join("refs"))?;
    std::fs::create_dir_all(repo_dir.join("blobs"))?;
    std::fs::write(repo_dir.join("refs/main"), &commit)?;
    for (n, relative) in list_files(folder)?.iter().enumerate() {
        let blob = repo_dir.join("blobs").join(format!("imported{n:05}"));
        std::fs::copy(folder.join(relative), &blob)?;
        let link = snapshot.join(relative);
        std::fs::create_dir_all(link.parent().expect("inside the snapshot"))?;
        // From the link's folder up to the repo folder: one level per path component.
        let depth = relative.split('/').count() + 1;
        let target = Path::new(&"../".repeat(depth))
            .join("blobs")
            .join(blob.file_name().expect("a file name"));
        #[cfg(unix)]
        std::os::unix::fs::symlink(target, &link)?;
        #[cfg(not(unix))]
        std::fs::copy(&blob, &link).map(|_| ())?;
    }
    Ok(snapshot)
}
