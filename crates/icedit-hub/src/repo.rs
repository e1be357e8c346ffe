//! A resolved model source that hands out local paths to the model's files.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use crate::cache::CachedRepo;
use crate::error::{HubError, MissingFiles, MissingReason, Result, UntrustedResponse};
use crate::listing::list_files;
use crate::options::HubOptions;
use crate::remote::{Failure, Remote, RemoteError};
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
    /// The commit this handle uses for every file, decided on first need.
    pin: Mutex<Option<PinResult>>,
}

type PinResult = std::result::Result<Arc<Pin>, Box<UntrustedResponse>>;

/// What one run (one handle) works from.
struct Pin {
    /// The snapshot every file comes from: what the Hub says the revision is now, or
    /// (offline, or the Hub could not answer) what the cache's `refs/` says. `None` when
    /// neither knows.
    commit: Option<String>,
    /// The files of `commit` according to the Hub; `None` when it was not asked or
    /// could not answer.
    listing: Option<BTreeSet<String>>,
    /// Why the Hub could not answer (online only).
    failure: Option<Failure>,
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
                // An absolute cache folder keeps our messages (and the download hint)
                // unambiguous whatever the working folder.
                let options = &options.clone().with_cache_dir(absolute(&options.cache_dir));
                let remote = if options.offline {
                    None
                } else {
                    Some(Remote::new(options, repo_id, revision))
                };
                Backend::Hub(Box::new(HubRepo {
                    repo_id: repo_id.clone(),
                    revision: revision.clone(),
                    endpoint: options.endpoint.clone(),
                    cache: CachedRepo::new(&options.cache_dir, repo_id, revision),
                    remote,
                    pin: Mutex::new(None),
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

    /// The commit every file of this handle comes from (Hub repos only).
    ///
    /// Online, the first call that needs it (this one, or the first file, listing or
    /// existence check) asks the Hub once which commit the revision is now and updates
    /// `refs/{revision}` in the cache; every file of the handle then comes from that
    /// commit's snapshot. Offline, or when the Hub cannot be reached, it is the commit the
    /// cache's `refs/{revision}` names (or the revision itself when it is a commit hash).
    /// `None` for local folders, and when no commit is known (nothing cached offline, or
    /// the Hub's answer was refused).
    pub fn commit(&self) -> Option<String> {
        match &self.backend {
            Backend::Local { .. } => None,
            Backend::Hub(hub) => hub.pin().ok().and_then(|pin| pin.commit.clone()),
        }
    }

    /// Like [`ModelRepo::describe`], but pinned: `owner/name@{commit}` when the commit is
    /// known (see [`ModelRepo::commit`]), else `owner/name@revision`; the canonical path of
    /// a local folder. What to record to reproduce a run.
    pub fn describe_commit(&self) -> String {
        match (&self.backend, self.commit()) {
            (Backend::Hub(hub), Some(commit)) => format!("{}@{commit}", hub.repo_id),
            _ => self.describe(),
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
    // By hand: the remote side holds the token.
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
    /// The commit (and listing) of this run, decided once.
    fn pin(&self) -> Result<Arc<Pin>> {
        let mut memo = self.pin.lock().unwrap_or_else(PoisonError::into_inner);
        let result = memo.get_or_insert_with(|| self.decide_pin()).clone();
        result.map_err(HubError::UntrustedResponse)
    }

    fn decide_pin(&self) -> PinResult {
        let Some(remote) = &self.remote else {
            return Ok(Arc::new(Pin {
                commit: self.cache.commit(),
                listing: None,
                failure: None,
            }));
        };
        match remote.revalidate() {
            Ok(snapshot) => {
                if self.cache.has_snapshot(&snapshot.commit) {
                    // Best effort: the files are served either way; a later download
                    // writes the ref again (and reports a failure then).
                    let _ = self.cache.set_ref(&snapshot.commit);
                }
                Ok(Arc::new(Pin {
                    commit: Some(snapshot.commit),
                    listing: Some(snapshot.files),
                    failure: None,
                }))
            }
            // Unreachable, refused, ...: work from the cache, as `huggingface_hub` does;
            // files not cached report this failure.
            Err(RemoteError::Failed(failure)) => Ok(Arc::new(Pin {
                commit: self.cache.commit(),
                listing: None,
                failure: Some(failure),
            })),
            Err(RemoteError::Untrusted(untrusted)) => Err(untrusted),
        }
    }

    fn cached(&self, pin: &Pin, name: &str) -> Option<PathBuf> {
        self.cache.file(pin.commit.as_deref()?, name)
    }

    fn files(&self, names: &[&str]) -> Result<Vec<PathBuf>> {
        let pin = self.pin()?;
        let mut resolved: HashMap<&str, PathBuf> = HashMap::new();
        let mut missing: Vec<&str> = Vec::new();
        for &name in names {
            if resolved.contains_key(name) || missing.contains(&name) {
                continue;
            }
            match self.cached(&pin, name) {
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
            if let Some(failure) = &pin.failure {
                return Err(self.missing_after(&missing, failure.clone()));
            }
            let (Some(commit), Some(listing)) = (&pin.commit, &pin.listing) else {
                return Err(self.missing(&missing, MissingReason::Failed, None));
            };
            // Check the whole set before downloading gigabytes of it.
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
                    .download(name, commit, &self.cache)
                    .map_err(|error| self.remote_error(&missing[done..], error))?;
                self.cache.set_ref(commit).map_err(|error| {
                    let detail = format!(
                        "cannot write `{}`: {error}",
                        self.cache.dir().join("refs").join(&self.revision).display()
                    );
                    self.missing(&missing[done..], MissingReason::Failed, Some(detail))
                })?;
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
        let pin = self.pin()?;
        if self.cached(&pin, name).is_some() {
            return Ok(true);
        }
        if self.remote.is_none() {
            return Ok(false);
        }
        match (&pin.listing, &pin.failure) {
            (Some(listing), _) => Ok(listing.contains(name)),
            // Unreachable Hub: answer from the cache, like offline mode.
            (None, Some(failure)) if failure.reason == MissingReason::Network => Ok(false),
            (None, Some(failure)) => Err(self.missing_after(&[], failure.clone())),
            (None, None) => Ok(false),
        }
    }

    fn list(&self) -> Result<Vec<String>> {
        let pin = self.pin()?;
        let cached = || {
            pin.commit
                .as_deref()
                .and_then(|commit| self.cache.list(commit))
        };
        if self.remote.is_none() {
            return cached().ok_or_else(|| self.missing(&[], MissingReason::Offline, None));
        }
        match (&pin.listing, &pin.failure) {
            (Some(listing), _) => Ok(listing.iter().cloned().collect()),
            // Unreachable Hub: fall back to the cached snapshot, as `huggingface_hub` does.
            (None, Some(failure)) if failure.reason == MissingReason::Network => {
                cached().ok_or_else(|| self.missing_after(&[], failure.clone()))
            }
            (None, Some(failure)) => Err(self.missing_after(&[], failure.clone())),
            (None, None) => Err(self.missing(&[], MissingReason::Failed, None)),
        }
    }

    fn remote_error(&self, files: &[&str], error: RemoteError) -> HubError {
        match error {
            RemoteError::Failed(failure) => self.missing_after(files, failure),
            RemoteError::Untrusted(untrusted) => HubError::UntrustedResponse(untrusted),
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
    // An index is a few hundred kilobytes; a pipe or a huge file is not one.
    const MAX_INDEX_BYTES: u64 = 64 << 20;
    let meta = std::fs::metadata(index_path).map_err(|source| HubError::Io {
        path: index_path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() || meta.len() > MAX_INDEX_BYTES {
        return Err(invalid(format!(
            "not a regular file of at most {MAX_INDEX_BYTES} bytes"
        )));
    }
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

/// One file given on its own (`--transformer`): a local path, or `hf:OWNER/REPO[@REVISION]/FILE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileSpec {
    Local(PathBuf),
    /// `repo` is `owner/name[@revision]`; `file` a path in it.
    Hub {
        repo: String,
        file: String,
    },
}

impl FileSpec {
    /// Checks the spec without touching the network: a local file must exist and be a file, a
    /// Hub reference must name a valid repo and a file in it.
    pub fn parse(spec: &str) -> Result<Self> {
        let invalid = |reason: String| HubError::InvalidSpec {
            spec: spec.to_string(),
            reason,
        };
        if let Some(rest) = spec.strip_prefix("hf:") {
            let mut parts = rest.splitn(3, '/');
            let (owner, name, file) = (
                parts.next().unwrap_or(""),
                parts.next().unwrap_or(""),
                parts.next().unwrap_or(""),
            );
            if file.is_empty() {
                return Err(invalid(
                    "a Hub file is `hf:OWNER/REPO[@REVISION]/FILE`, with the file's path in the \
                     repo (e.g. hf:YarvixPA/FLUX.1-Fill-dev-gguf/flux1-fill-dev-Q4_0.gguf)"
                        .into(),
                ));
            }
            let repo = format!("{owner}/{name}");
            ModelSource::parse(&format!("hf:{repo}"))?;
            check_file_name(file)?;
            return Ok(Self::Hub {
                repo,
                file: file.to_string(),
            });
        }
        let path = Path::new(spec);
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_file() => Ok(Self::Local(path.to_path_buf())),
            Ok(_) => Err(invalid(
                "it is a folder; name the weights file in it".into(),
            )),
            Err(_) => Err(HubError::PathNotFound {
                path: path.to_path_buf(),
            }),
        }
    }

    /// The file on disk, downloading it into the Hub cache if needed, and where it came from
    /// (the local path, or `owner/repo@commit/file`) for recipes.
    pub fn fetch(&self, options: &HubOptions) -> Result<(PathBuf, String)> {
        match self {
            FileSpec::Local(path) => Ok((path.clone(), path.display().to_string())),
            FileSpec::Hub { repo, file } => {
                let model = ModelRepo::open(&format!("hf:{repo}"), options)?;
                let path = model.file(file)?;
                Ok((path, format!("{}/{file}", model.describe_commit())))
            }
        }
    }
}
