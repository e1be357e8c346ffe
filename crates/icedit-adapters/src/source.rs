//! Where an adapter comes from: a manifest name (adapters/*.toml, built in), a Hub reference
//! `hf:OWNER/REPO[@REVISION][/FILE]`, or a local file or folder.

use std::path::{Path, PathBuf};

use icedit_hub::{HubOptions, ModelRepo, ModelSource};
use serde::Deserialize;

use crate::error::{AdapterError, Result};

/// The manifests shipped in the repo's `adapters/` folder, compiled in.
const BUILT_IN: [(&str, &str); 5] = [
    (
        "adapters/icedit-normal.toml",
        include_str!("../../../adapters/icedit-normal.toml"),
    ),
    (
        "adapters/icedit-moe.toml",
        include_str!("../../../adapters/icedit-moe.toml"),
    ),
    (
        "adapters/kontext-ps1.toml",
        include_str!("../../../adapters/kontext-ps1.toml"),
    ),
    (
        "adapters/turbo-alpha.toml",
        include_str!("../../../adapters/turbo-alpha.toml"),
    ),
    (
        "adapters/hyper-flux-8step.toml",
        include_str!("../../../adapters/hyper-flux-8step.toml"),
    ),
];

/// The 8-step LoRA `icedit edit --fast` stacks on the default adapter.
pub const TURBO_ADAPTER: &str = "turbo-alpha";

/// The adapter `icedit edit` uses when none is given.
pub const DEFAULT_ADAPTER: &str = "icedit-moe";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdapterKind {
    Lora,
    MoeLora,
}

/// An adapter manifest: a Hub repo and file with defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub repo: String,
    pub revision: Option<String>,
    /// The file in the repo; without it, the repo's only `.safetensors` file.
    pub file: Option<String>,
    pub kind: AdapterKind,
    #[serde(default = "one")]
    pub scale: f64,
    pub top_k: Option<usize>,
    pub base_model: Option<String>,
    /// The prompt template (prompts/NAME.txt) the adapter was trained with.
    pub prompt: Option<String>,
}

fn one() -> f64 {
    1.0
}

impl Manifest {
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let bad = |message: String| AdapterError::Manifest {
            path: origin.to_string(),
            message,
        };
        let manifest: Self = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        // TOML has nan and inf: refused here, before anything downloads, as --lora-scale is.
        if !manifest.scale.is_finite() {
            return Err(bad(format!(
                "scale = {}: a scale must be a finite number",
                manifest.scale
            )));
        }
        if manifest.top_k == Some(0) {
            return Err(bad(
                "top_k = 0: at least one expert must run per token".into()
            ));
        }
        Ok(manifest)
    }

    /// The built-in manifests.
    pub fn built_in() -> Vec<Manifest> {
        BUILT_IN
            .iter()
            .map(|(origin, text)| Self::parse(text, origin).expect("built-in manifests parse"))
            .collect()
    }

    pub fn find(name: &str) -> Option<Manifest> {
        Self::built_in().into_iter().find(|m| m.name == name)
    }
}

/// A parsed `--lora` argument.
#[derive(Debug, Clone, PartialEq)]
pub enum AdapterSpec {
    Manifest(String),
    Hub {
        repo: String,
        revision: Option<String>,
        file: Option<String>,
    },
    Path(PathBuf),
}

impl AdapterSpec {
    pub fn parse(spec: &str) -> Result<Self> {
        if let Some(rest) = spec.strip_prefix("hf:") {
            let mut parts = rest.splitn(3, '/');
            let (owner, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let file = parts.next().filter(|f| !f.is_empty()).map(str::to_string);
            let (name, revision) = match name.split_once('@') {
                Some((n, r)) => (n, Some(r.to_string())),
                None => (name, None),
            };
            if owner.is_empty() || name.is_empty() {
                return Err(AdapterError::UnknownAdapter {
                    name: spec.to_string(),
                    known: known_names(),
                });
            }
            // `hf:` always means the Hub, never a local folder of that name; the revision is
            // checked here too, before anything is resolved.
            let at_revision = revision
                .as_deref()
                .map(|r| format!("@{r}"))
                .unwrap_or_default();
            ModelSource::parse(&format!("hf:{owner}/{name}{at_revision}"))?;
            return Ok(Self::Hub {
                repo: format!("{owner}/{name}"),
                revision,
                file,
            });
        }
        if Manifest::find(spec).is_some() {
            return Ok(Self::Manifest(spec.to_string()));
        }
        let path = Path::new(spec);
        if path.exists() {
            return Ok(Self::Path(path.to_path_buf()));
        }
        Err(AdapterError::UnknownAdapter {
            name: spec.to_string(),
            known: known_names(),
        })
    }
}

fn known_names() -> String {
    Manifest::built_in()
        .iter()
        .map(|m| m.name.clone())
        .collect::<Vec<_>>()
        .join(", ")
}

/// An adapter made local: its file and the defaults its manifest gives.
#[derive(Debug, Clone)]
pub struct ResolvedAdapter {
    /// Manifest name, `hf:` reference or path, as given.
    pub name: String,
    pub path: PathBuf,
    /// Where it came from, for recipes: `owner/repo@rev/file` or the local path.
    pub origin: String,
    pub manifest: Option<Manifest>,
}

impl ResolvedAdapter {
    pub fn default_scale(&self) -> f64 {
        self.manifest.as_ref().map_or(1.0, |m| m.scale)
    }
}

/// The manifest a `--lora` spec names (built-in or a local `.toml`), read without touching the
/// network: its prompt template and base model are known before anything downloads.
pub fn manifest_of(spec: &str) -> Result<Option<Manifest>> {
    Ok(match AdapterSpec::parse(spec)? {
        AdapterSpec::Manifest(name) => Manifest::find(&name),
        AdapterSpec::Path(path) if is_manifest(&path) => Some(read_manifest(&path)?),
        _ => None,
    })
}

/// Makes the adapter file local (downloading it into the Hub cache if needed).
pub fn resolve(spec: &str, hub: &HubOptions) -> Result<ResolvedAdapter> {
    let (manifest, repo, revision, file) = match AdapterSpec::parse(spec)? {
        AdapterSpec::Manifest(name) => manifest_source(Manifest::find(&name).expect("parsed")),
        AdapterSpec::Path(path) if is_manifest(&path) => {
            let manifest = read_manifest(&path)?;
            if let Some(folder) = manifest_folder(&manifest, &path)? {
                let target = match &manifest.file {
                    Some(file) => folder.join(file),
                    None => folder,
                };
                let mut resolved = resolve_local(spec, &target)?;
                resolved.manifest = Some(manifest);
                return Ok(resolved);
            }
            manifest_source(manifest)
        }
        AdapterSpec::Path(path) => return resolve_local(spec, &path),
        AdapterSpec::Hub {
            repo,
            revision,
            file,
        } => (None, repo, revision, file),
    };
    let repo_spec = match &revision {
        Some(r) => format!("{repo}@{r}"),
        None => repo.clone(),
    };
    // A Hub repo id, never a local folder that happens to have that name.
    let model_repo = ModelRepo::open(&format!("hf:{repo_spec}"), hub)?;
    let file = match file {
        Some(f) => f,
        None => single_safetensors(&repo_spec, model_repo.list()?)?,
    };
    let path = model_repo.file(&file)?;
    Ok(ResolvedAdapter {
        name: spec.to_string(),
        origin: format!("{}/{file}", model_repo.describe_commit()),
        path,
        manifest,
    })
}

fn is_manifest(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "toml")
}

/// Manifests are a few hundred bytes; anything far larger is not one.
const MAX_MANIFEST_BYTES: u64 = 1 << 20;

fn read_manifest(path: &Path) -> Result<Manifest> {
    let bad = |message: String| AdapterError::Manifest {
        path: path.display().to_string(),
        message,
    };
    let meta = std::fs::metadata(path).map_err(|source| AdapterError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if meta.len() > MAX_MANIFEST_BYTES {
        return Err(bad(format!(
            "{} bytes; an adapter manifest is a small TOML file",
            meta.len()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|source| AdapterError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Manifest::parse(&text, &path.display().to_string())
}

/// A manifest's `repo` is a Hub repo id, or `./FOLDER` inside the manifest's own folder.
/// Returns that folder for the latter; refuses absolute paths and `..`.
fn manifest_folder(manifest: &Manifest, manifest_path: &Path) -> Result<Option<PathBuf>> {
    let bad = |message: String| AdapterError::Manifest {
        path: manifest_path.display().to_string(),
        message,
    };
    let repo = manifest.repo.as_str();
    let relative = Path::new(repo);
    if relative.is_absolute() || repo.starts_with('~') || repo.contains('\\') {
        return Err(bad(format!(
            "repo = {repo:?}: a manifest names a Hub repo id (owner/name) or a folder beside \
             it (./folder), never an absolute path"
        )));
    }
    if !repo.starts_with("./") && !repo.starts_with("../") {
        return Ok(None);
    }
    if relative
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(bad(format!(
            "repo = {repo:?}: a local adapter folder must be inside the manifest's folder (no `..`)"
        )));
    }
    if let Some(file) = &manifest.file {
        let file_path = Path::new(file);
        if file_path.is_absolute()
            || file_path
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(bad(format!(
                "file = {file:?}: a file name inside the adapter's folder is expected"
            )));
        }
    }
    let base = manifest_path.parent().unwrap_or(Path::new("."));
    Ok(Some(base.join(relative)))
}

type HubSource = (Option<Manifest>, String, Option<String>, Option<String>);

fn manifest_source(m: Manifest) -> HubSource {
    let (repo, revision, file) = (m.repo.clone(), m.revision.clone(), m.file.clone());
    (Some(m), repo, revision, file)
}

fn resolve_local(spec: &str, path: &Path) -> Result<ResolvedAdapter> {
    let file = if path.is_dir() {
        let names = std::fs::read_dir(path)
            .map_err(|source| AdapterError::Io {
                path: path.to_path_buf(),
                source,
            })?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        path.join(single_safetensors(&path.display().to_string(), names)?)
    } else {
        path.to_path_buf()
    };
    Ok(ResolvedAdapter {
        name: spec.to_string(),
        origin: file.display().to_string(),
        path: file,
        manifest: None,
    })
}

/// The one `.safetensors` file of a repo or folder listing.
fn single_safetensors(repo: &str, listing: Vec<String>) -> Result<String> {
    let mut found: Vec<String> = listing
        .into_iter()
        .filter(|f| f.ends_with(".safetensors"))
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(AdapterError::RepoListing {
            repo: repo.to_string(),
            message: "holds no .safetensors file".into(),
        }),
        _ => Err(AdapterError::RepoListing {
            repo: repo.to_string(),
            message: format!(
                "holds several .safetensors files ({}); name one, e.g. hf:{repo}/{}",
                found.join(", "),
                found[0]
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_manifests_parse_and_name_the_issue_repos() {
        let normal = Manifest::find("icedit-normal").unwrap();
        assert_eq!(normal.repo, "RiverZ/normal-lora");
        assert_eq!(
            normal.file.as_deref(),
            Some("pytorch_lora_weights.safetensors")
        );
        assert_eq!(normal.kind, AdapterKind::Lora);
        let moe = Manifest::find(DEFAULT_ADAPTER).unwrap();
        assert_eq!(moe.repo, "sanaka87/ICEdit-MoE-LoRA");
        assert_eq!(moe.file, None);
        assert_eq!(moe.kind, AdapterKind::MoeLora);
        assert_eq!(moe.top_k, Some(1));
    }

    /// Found by tests/fuzz_parsers.rs: these parsed, to fail (or blacken the image) later.
    #[test]
    fn manifests_with_unusable_numbers_are_refused() {
        let base = "name = \"x\"\nrepo = \"a/b\"\nkind = \"moe-lora\"\n";
        assert!(Manifest::parse(base, "m.toml").is_ok());
        for extra in ["scale = nan", "scale = +inf", "scale = -inf", "top_k = 0"] {
            let err = Manifest::parse(&format!("{base}{extra}\n"), "m.toml")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(extra.split(' ').next().unwrap()),
                "{extra}: {err}"
            );
        }
    }

    #[test]
    fn specs_parse() {
        assert_eq!(
            AdapterSpec::parse("icedit-normal").unwrap(),
            AdapterSpec::Manifest("icedit-normal".into())
        );
        assert_eq!(
            AdapterSpec::parse("hf:RiverZ/normal-lora").unwrap(),
            AdapterSpec::Hub {
                repo: "RiverZ/normal-lora".into(),
                revision: None,
                file: None
            }
        );
        assert_eq!(
            AdapterSpec::parse("hf:a/b@v2/sub/x.safetensors").unwrap(),
            AdapterSpec::Hub {
                repo: "a/b".into(),
                revision: Some("v2".into()),
                file: Some("sub/x.safetensors".into())
            }
        );
        let err = AdapterSpec::parse("icedit-nromal").unwrap_err().to_string();
        assert!(err.contains("icedit-normal, icedit-moe"), "{err}");
        assert!(AdapterSpec::parse("hf:onlyowner").is_err());
    }

    #[test]
    fn hub_references_resolve_through_the_cache() {
        let cache = tempfile::tempdir().unwrap();
        let folder = tempfile::tempdir().unwrap();
        std::fs::write(folder.path().join("moe.safetensors"), b"weights").unwrap();
        std::fs::write(folder.path().join("README.md"), b"card").unwrap();
        icedit_hub::import_folder(cache.path(), "sanaka87/ICEdit-MoE-LoRA", folder.path()).unwrap();
        let hub = HubOptions::new(cache.path()).with_offline(true);
        // The manifest names no file: the listing's only .safetensors file is taken.
        let resolved = resolve("icedit-moe", &hub).unwrap();
        assert!(
            resolved.path.ends_with("moe.safetensors"),
            "{:?}",
            resolved.path
        );
        // The origin names the commit the file came from (the import's fake commit here).
        let commit = resolved
            .origin
            .strip_prefix("sanaka87/ICEdit-MoE-LoRA@")
            .and_then(|r| r.strip_suffix("/moe.safetensors"))
            .unwrap();
        assert!(
            commit.len() == 40 && commit.bytes().all(|b| b.is_ascii_hexdigit()),
            "{}",
            resolved.origin
        );
        assert_eq!(resolved.manifest.unwrap().kind, AdapterKind::MoeLora);
        let by_ref = resolve("hf:sanaka87/ICEdit-MoE-LoRA/moe.safetensors", &hub).unwrap();
        assert_eq!(by_ref.path, resolved.path);
        assert!(by_ref.manifest.is_none());
        // Not cached and offline: the Hub's error, which says how to fix it.
        let err = resolve("icedit-normal", &hub).unwrap_err().to_string();
        assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
    }

    #[test]
    fn hf_references_are_hub_repo_ids() {
        for bad in [
            "hf:../../etc/passwd",
            "hf:../x",
            "hf:a/..",
            "hf:/etc/passwd",
            "hf:a b/c",
            // Found by tests/fuzz_parsers.rs: revisions were only checked on resolving.
            "hf:a/b@",
            "hf:a/b@..",
            "hf:a/b@x y/f.safetensors",
            "hf:a/b@x@y",
        ] {
            assert!(AdapterSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn manifest_repos_are_repo_ids_or_folders_beside_the_manifest() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("weights")).unwrap();
        std::fs::write(dir.path().join("weights/a.safetensors"), b"w").unwrap();
        let write = |name: &str, repo: &str| {
            let path = dir.path().join(name);
            std::fs::write(
                &path,
                format!("name = \"x\"\nrepo = {repo:?}\nkind = \"lora\"\n"),
            )
            .unwrap();
            path.display().to_string()
        };
        let hub = HubOptions::new(dir.path().join("cache")).with_offline(true);
        let local = resolve(&write("local.toml", "./weights"), &hub).unwrap();
        assert!(local.path.ends_with("weights/a.safetensors"));
        assert!(local.manifest.is_some());
        for (name, repo) in [
            ("abs.toml", "/etc"),
            ("up.toml", "../weights"),
            ("deep.toml", "./weights/../../x"),
            ("home.toml", "~/x"),
        ] {
            let err = resolve(&write(name, repo), &hub).unwrap_err().to_string();
            assert!(err.contains("repo ="), "{repo}: {err}");
        }
        // A repo id goes to the Hub (here: offline, not cached).
        let err = resolve(&write("hub.toml", "owner/name"), &hub)
            .unwrap_err()
            .to_string();
        assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
        assert!(manifest_of(&write("m.toml", "owner/name"))
            .unwrap()
            .is_some());
        // Not a manifest: a pipe or a huge file is refused without reading it all.
        let big = dir.path().join("big.toml");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_MANIFEST_BYTES + 1)
            .unwrap();
        assert!(manifest_of(big.to_str().unwrap()).is_err());
    }

    #[test]
    fn listing_picks_the_single_safetensors_file() {
        let one = vec!["README.md".into(), "moe.safetensors".into()];
        assert_eq!(single_safetensors("a/b", one).unwrap(), "moe.safetensors");
        let two = vec!["x.safetensors".into(), "y.safetensors".into()];
        let err = single_safetensors("a/b", two).unwrap_err().to_string();
        assert!(err.contains("hf:a/b/x.safetensors"), "{err}");
        assert!(single_safetensors("a/b", vec![]).is_err());
    }
}
