//! Reading the standard Hugging Face cache layout, shared with Python's `huggingface_hub`:
//!
//! ```text
//! {cache_dir}/models--{owner}--{name}/
//!     blobs/{etag}                       file contents
//!     refs/{revision}                    a commit hash (branch or tag -> commit)
//!     snapshots/{commit}/{file path}     symlinks (or copies) of the blobs
//! ```

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::listing::list_files;

/// Suffix hf-hub gives a blob while it downloads it (`blobs/{etag}.part`).
const PARTIAL_DOWNLOAD_EXTENSION: &str = "part";

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
            .filter(|commit| is_plain_name(commit));
        from_ref.or_else(|| is_commit_hash(&self.revision).then(|| self.revision.clone()))
    }

    pub(crate) fn snapshot_dir(&self) -> Option<PathBuf> {
        let dir = self.dir.join("snapshots").join(self.commit()?);
        dir.is_dir().then_some(dir)
    }

    /// The cached copy of `relative`; a dangling link (blob deleted) counts as absent.
    pub(crate) fn file(&self, relative: &str) -> Option<PathBuf> {
        let path = self.snapshot_dir()?.join(relative);
        path.is_file().then_some(path)
    }

    /// The files of the cached snapshot, or `None` when no snapshot is cached.
    pub(crate) fn list(&self) -> Option<Vec<String>> {
        list_files(&self.snapshot_dir()?).ok()
    }

    /// Partial downloads currently in `blobs/`.
    pub(crate) fn partial_downloads(&self) -> BTreeSet<PathBuf> {
        let Ok(entries) = std::fs::read_dir(self.dir.join("blobs")) else {
            return BTreeSet::new();
        };
        entries
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| {
                path.extension()
                    .is_some_and(|ext| ext == PARTIAL_DOWNLOAD_EXTENSION)
            })
            .collect()
    }
}

/// `owner/name` -> `models--owner--name`, as both hf-hub and `huggingface_hub` name it.
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

/// A ref file's content becomes a folder name: it must not climb out of `snapshots/`.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\'])
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
