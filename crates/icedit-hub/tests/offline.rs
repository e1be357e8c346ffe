//! Hub repos served from a fake cache in offline mode, and local model folders.

mod common;

use common::{read, FakeCache, COMMIT_MAIN, COMMIT_PINNED, COMMIT_V1, FLUX};
use icedit_hub::{HubError, MissingReason, ModelRepo, ModelSource};

const TRANSFORMER_INDEX: &str = r#"{
  "metadata": {"total_size": 3},
  "weight_map": {
    "a.weight": "diffusion_pytorch_model-00002-of-00003.safetensors",
    "b.weight": "diffusion_pytorch_model-00001-of-00003.safetensors",
    "c.weight": "diffusion_pytorch_model-00003-of-00003.safetensors",
    "d.weight": "diffusion_pytorch_model-00001-of-00003.safetensors"
  }
}"#;

/// FLUX.1-Fill-dev's layout at `main`, small: sharded transformer and T5, single-file VAE.
fn flux_cache() -> FakeCache {
    let cache = FakeCache::new();
    let add = |name: &str, contents: &str| cache.add(FLUX, COMMIT_MAIN, name, contents.as_bytes());
    add("model_index.json", "{}");
    add("transformer/config.json", "transformer config");
    add(
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        TRANSFORMER_INDEX,
    );
    for shard in 1..=3 {
        add(
            &format!("transformer/diffusion_pytorch_model-0000{shard}-of-00003.safetensors"),
            &format!("transformer shard {shard}"),
        );
    }
    add("vae/diffusion_pytorch_model.safetensors", "vae weights");
    add("text_encoder/model.safetensors", "clip weights");
    cache.set_ref(FLUX, "main", COMMIT_MAIN);
    cache
}

fn open_offline(cache: &FakeCache, spec: &str) -> ModelRepo {
    ModelRepo::open(spec, &cache.offline()).expect("open repo")
}

fn missing_files(error: HubError) -> icedit_hub::MissingFiles {
    match error {
        HubError::MissingFiles(missing) => *missing,
        other => panic!("expected MissingFiles, got {other:?}"),
    }
}

#[test]
fn single_files_resolve_through_refs_main() {
    let cache = flux_cache();
    let repo = open_offline(&cache, FLUX);
    assert_eq!(repo.describe(), format!("{FLUX}@main"));

    let config = repo.file("transformer/config.json").unwrap();
    assert_eq!(read(&config), "transformer config");
    assert!(config.starts_with(cache.repo_dir(FLUX).join("snapshots").join(COMMIT_MAIN)));

    let both = repo
        .files(&[
            "vae/diffusion_pytorch_model.safetensors",
            "model_index.json",
        ])
        .unwrap();
    assert_eq!(read(&both[0]), "vae weights");
    assert_eq!(read(&both[1]), "{}");
}

#[test]
fn sharded_safetensors_set_follows_the_index() {
    let cache = flux_cache();
    let repo = open_offline(&cache, FLUX);
    let shards = repo
        .safetensors_set("transformer", "diffusion_pytorch_model")
        .unwrap();
    let contents: Vec<String> = shards.iter().map(|path| read(path)).collect();
    assert_eq!(
        contents,
        [
            "transformer shard 1",
            "transformer shard 2",
            "transformer shard 3"
        ]
    );

    let vae = repo
        .safetensors_set("vae", "diffusion_pytorch_model")
        .unwrap();
    assert_eq!(vae.len(), 1);
    assert_eq!(read(&vae[0]), "vae weights");

    // A trailing slash on the folder is fine.
    let clip = repo.safetensors_set("text_encoder/", "model").unwrap();
    assert_eq!(read(&clip[0]), "clip weights");
}

#[test]
fn incomplete_shard_set_lists_every_missing_shard() {
    let cache = FakeCache::new();
    cache.add(
        FLUX,
        COMMIT_MAIN,
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        TRANSFORMER_INDEX.as_bytes(),
    );
    cache.add(
        FLUX,
        COMMIT_MAIN,
        "transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
        b"shard 2",
    );
    cache.set_ref(FLUX, "main", COMMIT_MAIN);
    let repo = open_offline(&cache, FLUX);

    let missing = missing_files(
        repo.safetensors_set("transformer", "diffusion_pytorch_model")
            .unwrap_err(),
    );
    assert_eq!(
        missing.files,
        [
            "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
            "transformer/diffusion_pytorch_model-00003-of-00003.safetensors",
        ]
    );
}

#[test]
fn missing_weights_name_both_layouts() {
    let cache = flux_cache();
    let repo = open_offline(&cache, FLUX);
    let error = repo.safetensors_set("text_encoder_2", "model").unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("text_encoder_2/model.safetensors.index.json"),
        "{message}"
    );
    assert!(
        message.contains("text_encoder_2/model.safetensors"),
        "{message}"
    );
}

#[test]
fn bad_index_files_are_reported() {
    let cache = FakeCache::new();
    cache.add(
        FLUX,
        COMMIT_MAIN,
        "a/w.safetensors.index.json",
        br#"{"weight_map": {"x": "../../evil.safetensors"}}"#,
    );
    cache.add(FLUX, COMMIT_MAIN, "b/w.safetensors.index.json", b"not json");
    cache.add(
        FLUX,
        COMMIT_MAIN,
        "c/w.safetensors.index.json",
        br#"{"weight_map": {}}"#,
    );
    cache.set_ref(FLUX, "main", COMMIT_MAIN);
    let repo = open_offline(&cache, FLUX);
    for dir in ["a", "b", "c"] {
        let error = repo.safetensors_set(dir, "w").unwrap_err();
        assert!(
            matches!(error, HubError::InvalidIndex { .. }),
            "{dir}: {error:?}"
        );
    }
}

#[test]
fn other_revisions_use_their_ref_or_commit() {
    let cache = flux_cache();
    cache.add(FLUX, COMMIT_V1, "transformer/config.json", b"v1 config");
    cache.set_ref(FLUX, "v1", COMMIT_V1);
    // A pinned commit with no ref file at all, as after downloading by hash elsewhere.
    cache.add(
        FLUX,
        COMMIT_PINNED,
        "transformer/config.json",
        b"pinned config",
    );

    let v1 = open_offline(&cache, &format!("{FLUX}@v1"));
    assert_eq!(
        read(&v1.file("transformer/config.json").unwrap()),
        "v1 config"
    );
    assert_eq!(v1.describe(), format!("{FLUX}@v1"));

    let pinned = open_offline(&cache, &format!("{FLUX}@{COMMIT_PINNED}"));
    assert_eq!(
        read(&pinned.file("transformer/config.json").unwrap()),
        "pinned config"
    );

    let main = open_offline(&cache, FLUX);
    assert_eq!(
        read(&main.file("transformer/config.json").unwrap()),
        "transformer config"
    );

    // A branch with no ref in the cache has nothing cached.
    let unknown = open_offline(&cache, &format!("{FLUX}@dev"));
    let missing = missing_files(unknown.file("transformer/config.json").unwrap_err());
    assert_eq!(missing.revision, "dev");
}

#[test]
fn missing_files_give_one_error_with_everything_needed_to_fix_it() {
    let cache = flux_cache();
    let repo = open_offline(&cache, FLUX);
    let wanted = [
        "transformer/config.json",
        "text_encoder_2/model-00001-of-00002.safetensors",
        "text_encoder_2/model-00002-of-00002.safetensors",
        "tokenizer_2/spiece.model",
    ];
    let error = repo.files(&wanted).unwrap_err();
    let message = error.to_string();
    let missing = missing_files(error);

    assert_eq!(missing.files, wanted[1..]);
    assert_eq!(missing.reason, MissingReason::Offline);
    assert_eq!(missing.repo_id, FLUX);
    assert_eq!(missing.revision, "main");
    assert_eq!(missing.cache_dir, cache.repo_dir(FLUX));

    for expected in [
        "cannot get 3 files",
        FLUX,
        "@main",
        "text_encoder_2/model-00001-of-00002.safetensors",
        "text_encoder_2/model-00002-of-00002.safetensors",
        "tokenizer_2/spiece.model",
        &cache.repo_dir(FLUX).display().to_string(),
        "HF_HUB_OFFLINE",
        "HF_TOKEN",
        "huggingface-cli login",
        "https://huggingface.co/black-forest-labs/FLUX.1-Fill-dev",
        "huggingface-cli download black-forest-labs/FLUX.1-Fill-dev text_encoder_2/model-00001-of-00002.safetensors",
        "local folder in diffusers layout",
    ] {
        assert!(message.contains(expected), "missing `{expected}` in:\n{message}");
    }
    assert!(!message.contains("transformer/config.json"), "{message}");
}

#[test]
fn download_hint_names_a_non_main_revision() {
    let cache = FakeCache::new();
    let repo = open_offline(&cache, "owner/name@v2");
    let message = repo.file("a.json").unwrap_err().to_string();
    assert!(
        message.contains("huggingface-cli download owner/name --revision v2 a.json"),
        "{message}"
    );
}

#[test]
fn exists_and_list_offline_use_the_cached_snapshot() {
    let cache = flux_cache();
    let repo = open_offline(&cache, FLUX);
    assert!(repo.exists("transformer/config.json").unwrap());
    assert!(!repo.exists("transformer/missing.json").unwrap());
    assert!(
        !repo.exists("transformer").unwrap(),
        "folders are not files"
    );

    let listing = repo.list().unwrap();
    assert_eq!(
        listing,
        [
            "model_index.json",
            "text_encoder/model.safetensors",
            "transformer/config.json",
            "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
            "transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
            "transformer/diffusion_pytorch_model-00003-of-00003.safetensors",
            "transformer/diffusion_pytorch_model.safetensors.index.json",
            "vae/diffusion_pytorch_model.safetensors",
        ]
    );

    // Nothing cached: listing is impossible offline, and the error says so.
    let other = open_offline(&cache, "owner/uncached");
    let missing = missing_files(other.list().unwrap_err());
    assert!(missing.files.is_empty());
    assert_eq!(missing.reason, MissingReason::Offline);
    assert!(other
        .list()
        .unwrap_err()
        .to_string()
        .contains("cannot list the files"));
    assert!(!other.exists("x.json").unwrap());
}

#[test]
fn a_deleted_blob_counts_as_missing() {
    let cache = flux_cache();
    let repo = open_offline(&cache, FLUX);
    let config = repo.file("transformer/config.json").unwrap();
    std::fs::remove_file(config.canonicalize().unwrap()).unwrap();
    let missing = missing_files(repo.file("transformer/config.json").unwrap_err());
    assert_eq!(missing.files, ["transformer/config.json"]);
}

#[test]
fn file_names_must_stay_inside_the_model() {
    let cache = flux_cache();
    let repo = open_offline(&cache, FLUX);
    for name in [
        "",
        "/etc/passwd",
        "../secret",
        "a/../../b",
        "a//b",
        "./a",
        "a\\b",
    ] {
        let error = repo.file(name).unwrap_err();
        assert!(
            matches!(error, HubError::InvalidFileName { .. }),
            "{name}: {error:?}"
        );
        assert!(repo.exists(name).is_err(), "{name}");
    }
}

#[test]
fn hand_built_hub_sources_are_validated() {
    let cache = FakeCache::new();
    let source = ModelSource::Hub {
        repo_id: "../../escape".to_string(),
        revision: "main".to_string(),
    };
    assert!(ModelRepo::new(source, &cache.offline()).is_err());
}

/// A local model folder in diffusers layout.
fn local_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, contents: &str| {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, contents).unwrap();
    };
    write("model_index.json", "{}");
    write("transformer/config.json", "local config");
    write(
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        TRANSFORMER_INDEX,
    );
    for shard in 1..=3 {
        write(
            &format!("transformer/diffusion_pytorch_model-0000{shard}-of-00003.safetensors"),
            &format!("local shard {shard}"),
        );
    }
    write("vae/diffusion_pytorch_model.safetensors", "local vae");
    // Left by `huggingface-cli download --local-dir`; not part of the model.
    write(".cache/huggingface/download/model_index.json.metadata", "x");
    dir
}

#[test]
fn local_folders_hand_out_their_files() {
    let folder = local_model();
    let cache = FakeCache::new();
    let repo = open_offline(&cache, folder.path().to_str().unwrap());
    let canonical = folder.path().canonicalize().unwrap();
    assert_eq!(repo.describe(), canonical.display().to_string());
    assert_eq!(
        repo.source(),
        &ModelSource::Local(folder.path().to_path_buf())
    );

    assert_eq!(
        read(&repo.file("transformer/config.json").unwrap()),
        "local config"
    );
    assert!(repo
        .exists("vae/diffusion_pytorch_model.safetensors")
        .unwrap());
    assert!(!repo.exists("vae/config.json").unwrap());

    let shards = repo
        .safetensors_set("transformer", "diffusion_pytorch_model")
        .unwrap();
    let contents: Vec<String> = shards.iter().map(|path| read(path)).collect();
    assert_eq!(
        contents,
        ["local shard 1", "local shard 2", "local shard 3"]
    );
    let vae = repo
        .safetensors_set("vae", "diffusion_pytorch_model")
        .unwrap();
    assert_eq!(read(&vae[0]), "local vae");

    assert_eq!(
        repo.list().unwrap(),
        [
            "model_index.json",
            "transformer/config.json",
            "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
            "transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
            "transformer/diffusion_pytorch_model-00003-of-00003.safetensors",
            "transformer/diffusion_pytorch_model.safetensors.index.json",
            "vae/diffusion_pytorch_model.safetensors",
        ]
    );
}

#[test]
fn local_missing_files_are_listed_with_full_paths() {
    let folder = local_model();
    let cache = FakeCache::new();
    let repo = open_offline(&cache, folder.path().to_str().unwrap());
    let canonical = folder.path().canonicalize().unwrap();

    let error = repo
        .files(&[
            "transformer/config.json",
            "vae/config.json",
            "text_encoder/model.safetensors",
        ])
        .unwrap_err();
    let message = error.to_string();
    match error {
        HubError::MissingLocalFiles { dir, paths, .. } => {
            assert_eq!(dir, canonical);
            assert_eq!(
                paths,
                [
                    canonical.join("vae/config.json"),
                    canonical.join("text_encoder/model.safetensors"),
                ]
            );
        }
        other => panic!("expected MissingLocalFiles, got {other:?}"),
    }
    assert!(message.contains(&canonical.join("vae/config.json").display().to_string()));

    let single = repo
        .file("scheduler/scheduler_config.json")
        .unwrap_err()
        .to_string();
    assert!(
        single.contains(
            &canonical
                .join("scheduler/scheduler_config.json")
                .display()
                .to_string()
        ),
        "{single}"
    );

    let weights = repo
        .safetensors_set("text_encoder_2", "model")
        .unwrap_err()
        .to_string();
    assert!(
        weights.contains("model.safetensors.index.json"),
        "{weights}"
    );
}

#[test]
fn a_vanished_local_folder_is_reported() {
    let folder = local_model();
    let source = ModelSource::parse(folder.path().to_str().unwrap()).unwrap();
    let path = folder.path().to_path_buf();
    drop(folder);
    let cache = FakeCache::new();
    let error = ModelRepo::new(source, &cache.offline()).unwrap_err();
    assert!(matches!(error, HubError::PathNotFound { .. }), "{error:?}");
    assert!(error.to_string().contains(&path.display().to_string()));
}
