//! A resolved model source that hands out local paths to the model's files.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use crate::cache::CachedRepo;
use crate::error::{HubError, MissingFiles, MissingReason, Result};
use crate::listing::list_files;
use crate::options::HubOptions;
use crate::remote::{Failure, Remote};
use crate::source::{absolute, check_hub, ModelSource};

/// A model folder or Hub repo, ready to hand out file paths.
///
/// File names are repo paths relative to the model root, with `/` separators, e.g.
/// `transformer/config.json`.
pub struct ModelRepo {
    source: ModelSource,
    backend: Backend,
}

enum Backend {
    Local { root: PathBuf },
    Hub(Box<HubRepo>),
}

struct HubRepo {
    repo_id: String,
    revision: String,
    endpoint: String,
    cache: CachedRepo,
    /// `None` in offline mode: only the cache is used.
    remote: Option<Remote>,
}

impl ModelRepo {
    /// Parses `spec` (see [`ModelSource::parse`]) and opens it.
    pub fn open(spec: &str, options: &HubOptions) -> Result<Self> {
        Self::new(ModelSource::parse(spec)?, options)
    }

    /// Opens a source. Nothing is downloaded yet; a local folder must exist.
    pub fn new(source: ModelSource, options: &HubOptions) -> Result<Self> {
        let backend = match &source {
            ModelSource::Local(dir) => Backend::Local {
                root: open_local_root(dir)?,
            },
            ModelSource::Hub { repo_id, revision } => {
                check_hub(repo_id, revision)?;
                // hf-hub links snapshot entries to blobs by relative paths computed from
                // these; an absolute cache folder keeps that (and our messages) unambiguous.
                let options = &options.clone().with_cache_dir(absolute(&options.cache_dir));
                let remote = if options.offline {
                    None
                } else {
                    Some(Remote::new(options, repo_id, revision)?)
                };
                Backend::Hub(Box::new(HubRepo {
                    repo_id: repo_id.clone(),
                    revision: revision.clone(),
                    endpoint: options.endpoint.clone(),
                    cache: CachedRepo::new(&options.cache_dir, repo_id, revision),
                    remote,
                }))
            }
        };
        Ok(Self { source, backend })
    }

    pub fn source(&self) -> &ModelSource {
        &self.source
    }

    /// `owner/name@revision`, or the canonical path of a local folder.
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Local { root } => root.display().to_string(),
            Backend::Hub(hub) => format!("{}@{}", hub.repo_id, hub.revision),
        }
    }

    /// The local path of one file, downloading it into the cache if needed (and allowed).
    pub fn file(&self, relative: &str) -> Result<PathBuf> {
        let mut paths = self.files(&[relative])?;
        paths.pop().ok_or_else(|| HubError::InvalidFileName {
            name: relative.to_string(),
            reason: "no path was produced for it",
        })
    }

    /// The local paths of several files, in the order asked.
    ///
    /// Checks all of them first: when some are missing and cannot be fetched, the error
    /// lists every one of them (and nothing is downloaded if the repo listing already
    /// shows that the set cannot be completed).
    pub fn files(&self, relatives: &[&str]) -> Result<Vec<PathBuf>> {
        for name in relatives {
            check_file_name(name)?;
        }
        match &self.backend {
            Backend::Local { root } => local_files(root, relatives),
            Backend::Hub(hub) => hub.files(relatives),
        }
    }

    /// Whether the model has this file. Hub: the cache, then (online) the repo listing.
    pub fn exists(&self, relative: &str) -> Result<bool> {
        check_file_name(relative)?;
        match &self.backend {
            Backend::Local { root } => Ok(root.join(relative).is_file()),
            Backend::Hub(hub) => hub.exists(relative),
        }
    }

    /// Every file of the model, relative with `/`, sorted. Hub offline: the cached
    /// snapshot's files only.
    pub fn list(&self) -> Result<Vec<String>> {
        match &self.backend {
            Backend::Local { root } => list_files(root).map_err(|source| HubError::Io {
                path: root.clone(),
                source,
            }),
            Backend::Hub(hub) => hub.list(),
        }
    }

    /// The weight files of a safetensors set such as `transformer/diffusion_pytorch_model`:
    /// the shards named by `{dir}/{stem}.safetensors.index.json` (distinct, sorted) when
    /// that index exists, else the single `{dir}/{stem}.safetensors`.
    pub fn safetensors_set(&self, dir: &str, stem: &str) -> Result<Vec<PathBuf>> {
        let prefix = match dir.trim_end_matches('/') {
            "" => String::new(),
            dir => format!("{dir}/"),
        };
        let index = format!("{prefix}{stem}.safetensors.index.json");
        let single = format!("{prefix}{stem}.safetensors");

        if self.exists(&index)? {
            let shards = read_shard_names(&self.file(&index)?)?;
            let shard_paths: Vec<String> = shards
                .iter()
                .map(|shard| format!("{prefix}{shard}"))
                .collect();
            let shard_refs: Vec<&str> = shard_paths.iter().map(String::as_str).collect();
            return self.files(&shard_refs);
        }
        let single_path = self.file(&single).map_err(|error| {
            with_note(
                error,
                format!(
                    "the weights are either the single file `{single}` or the shards listed \
                     in `{index}`; neither was found"
                ),
            )
        })?;
        Ok(vec![single_path])
    }
}

impl fmt::Debug for ModelRepo {
    // By hand: hf-hub's client would print the Authorization header.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let offline = match &self.backend {
            Backend::Local { .. } => None,
            Backend::Hub(hub) => Some(hub.remote.is_none()),
        };
        f.debug_struct("ModelRepo")
            .field("source", &self.describe())
            .field("offline", &offline)
            .finish()
    }
}

impl HubRepo {
    fn files(&self, names: &[&str]) -> Result<Vec<PathBuf>> {
        let mut resolved: HashMap<&str, PathBuf> = HashMap::new();
        let mut missing: Vec<&str> = Vec::new();
        for &name in names {
            if resolved.contains_key(name) || missing.contains(&name) {
                continue;
            }
            match self.cache.file(name) {
                Some(path) => {
                    resolved.insert(name, path);
                }
                None => missing.push(name),
            }
        }

        if !missing.is_empty() {
            let Some(remote) = &self.remote else {
                return Err(self.missing(&missing, MissingReason::Offline, None));
            };
            // Check the whole set before downloading gigabytes of it.
            let listing = remote
                .listing()
                .map_err(|failure| self.missing_after(&missing, failure))?;
            let absent: Vec<&str> = missing
                .iter()
                .copied()
                .filter(|name| !listing.contains(*name))
                .collect();
            if !absent.is_empty() {
                return Err(self.missing(&absent, MissingReason::NotInRepo, None));
            }
            for (done, &name) in missing.iter().enumerate() {
                let path = remote
                    .download(name, &self.cache)
                    .map_err(|failure| self.missing_after(&missing[done..], failure))?;
                resolved.insert(name, path);
            }
        }

        names
            .iter()
            .map(|name| {
                resolved
                    .get(name)
                    .cloned()
                    .ok_or_else(|| self.missing(&[name], MissingReason::Failed, None))
            })
            .collect()
    }

    fn exists(&self, name: &str) -> Result<bool> {
        if self.cache.file(name).is_some() {
            return Ok(true);
        }
        let Some(remote) = &self.remote else {
            return Ok(false);
        };
        match remote.listing() {
            Ok(listing) => Ok(listing.contains(name)),
            // Unreachable Hub: answer from the cache, like offline mode.
            Err(failure) if failure.reason == MissingReason::Network => Ok(false),
            Err(failure) => Err(self.missing_after(&[], failure)),
        }
    }

    fn list(&self) -> Result<Vec<String>> {
        let Some(remote) = &self.remote else {
            return self
                .cache
                .list()
                .ok_or_else(|| self.missing(&[], MissingReason::Offline, None));
        };
        match remote.listing() {
            Ok(listing) => Ok(listing.iter().cloned().collect()),
            // Unreachable Hub: fall back to the cached snapshot, as `huggingface_hub` does.
            Err(failure) if failure.reason == MissingReason::Network => self
                .cache
                .list()
                .ok_or_else(|| self.missing_after(&[], failure)),
            Err(failure) => Err(self.missing_after(&[], failure)),
        }
    }

    fn missing_after(&self, files: &[&str], failure: Failure) -> HubError {
        self.missing(files, failure.reason, Some(failure.detail))
    }

    fn missing(&self, files: &[&str], reason: MissingReason, detail: Option<String>) -> HubError {
        MissingFiles {
            repo_id: self.repo_id.clone(),
            revision: self.revision.clone(),
            cache_dir: self.cache.dir().to_path_buf(),
            endpoint: self.endpoint.clone(),
            files: files.iter().map(|file| file.to_string()).collect(),
            reason,
            detail,
            note: None,
        }
        .into()
    }
}

fn open_local_root(dir: &Path) -> Result<PathBuf> {
    let root = dir.canonicalize().map_err(|_| HubError::PathNotFound {
        path: absolute(dir),
    })?;
    if !root.is_dir() {
        return Err(HubError::NotAFolder { path: root });
    }
    Ok(root)
}

fn local_files(root: &Path, names: &[&str]) -> Result<Vec<PathBuf>> {
    let paths: Vec<PathBuf> = names.iter().map(|name| root.join(name)).collect();
    let missing: Vec<PathBuf> = paths
        .iter()
        .filter(|path| !path.is_file())
        .cloned()
        .collect();
    if missing.is_empty() {
        Ok(paths)
    } else {
        Err(HubError::MissingLocalFiles {
            dir: root.to_path_buf(),
            paths: missing,
            note: None,
        })
    }
}

/// File names are repo paths: relative, `/`-separated, never leaving the model root.
fn check_file_name(name: &str) -> Result<()> {
    let invalid = |reason| {
        Err(HubError::InvalidFileName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return invalid("it is empty");
    }
    if name.contains('\\') {
        return invalid("use `/` to separate folders");
    }
    if name.starts_with('/') || Path::new(name).is_absolute() {
        return invalid("it must be relative to the model folder");
    }
    if name
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return invalid("it must not contain empty, `.` or `..` parts");
    }
    Ok(())
}

/// The distinct shard file names of a safetensors index, sorted.
fn read_shard_names(index_path: &Path) -> Result<BTreeSet<String>> {
    #[derive(serde::Deserialize)]
    struct SafetensorsIndex {
        weight_map: BTreeMap<String, String>,
    }

    let invalid = |reason: String| HubError::InvalidIndex {
        path: index_path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(index_path).map_err(|source| HubError::Io {
        path: index_path.to_path_buf(),
        source,
    })?;
    let index: SafetensorsIndex =
        serde_json::from_str(&text).map_err(|error| invalid(error.to_string()))?;
    let shards: BTreeSet<String> = index.weight_map.into_values().collect();
    if shards.is_empty() {
        return Err(invalid("its weight_map is empty".to_string()));
    }
    // Shards sit next to their index; a path here would point elsewhere.
    if let Some(bad) = shards
        .iter()
        .find(|shard| shard.contains(['/', '\\']) || *shard == "." || *shard == "..")
    {
        return Err(invalid(format!(
            "shard `{bad}` is not a plain file name next to the index"
        )));
    }
    Ok(shards)
}

fn with_note(mut error: HubError, text: String) -> HubError {
    match &mut error {
        HubError::MissingFiles(missing) => missing.note = Some(text),
        HubError::MissingLocalFiles { note, .. } => *note = Some(text),
        _ => {}
    }
    error
}
