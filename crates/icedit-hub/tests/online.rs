//! The online path against an unreachable endpoint and a fake Hub on localhost.
//! Nothing here leaves the machine; with a proxy configured the tests skip themselves.

mod common;

use std::time::{Duration, Instant};

use common::{partial_files, proxy_configured, read, FakeCache, FakeHub, FakeRepo, FLUX};
use icedit_hub::{HubError, HubOptions, MissingFiles, MissingReason, ModelRepo};

const COMMIT: &str = "4444444444444444444444444444444444444444";

fn online(cache: &FakeCache, endpoint: &str) -> HubOptions {
    HubOptions::new(cache.dir())
        .with_endpoint(endpoint)
        .with_download_retries(0)
}

fn missing_files(error: HubError) -> MissingFiles {
    match error {
        HubError::MissingFiles(missing) => *missing,
        other => panic!("expected MissingFiles, got {other:?}"),
    }
}

macro_rules! skip_behind_proxy {
    () => {
        if proxy_configured() {
            eprintln!("skipped: a proxy is configured, requests could leave the machine");
            return;
        }
    };
}

#[test]
fn unreachable_hub_gives_the_clear_error_and_leaves_nothing_behind() {
    skip_behind_proxy!();
    let cache = FakeCache::new();
    // Port 9 (discard) on localhost: refused at once, no real network involved.
    let options = online(&cache, "http://127.0.0.1:9");
    let repo = ModelRepo::open(FLUX, &options).unwrap();

    let started = Instant::now();
    let wanted = ["transformer/config.json", "vae/config.json"];
    let error = repo.files(&wanted).unwrap_err();
    let message = error.to_string();
    let missing = missing_files(error);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    assert_eq!(missing.files, wanted);
    assert_eq!(missing.reason, MissingReason::Network);
    assert!(missing.detail.is_some());
    for expected in [
        "127.0.0.1:9",
        "HF_ENDPOINT",
        "HF_TOKEN",
        "huggingface-cli download",
    ] {
        assert!(
            message.contains(expected),
            "missing `{expected}` in:\n{message}"
        );
    }
    assert_eq!(
        cache.all_files(),
        Vec::<String>::new(),
        "the cache must stay empty"
    );

    // Unreachable: `exists` answers from the cache, `list` has no cache to fall back on.
    assert!(!repo.exists("vae/config.json").unwrap());
    assert_eq!(
        missing_files(repo.list().unwrap_err()).reason,
        MissingReason::Network
    );
}

#[test]
fn unreachable_hub_falls_back_to_the_cached_listing() {
    skip_behind_proxy!();
    let cache = FakeCache::new();
    cache.add(FLUX, COMMIT, "model_index.json", b"{}");
    cache.set_ref(FLUX, "main", COMMIT);
    let repo = ModelRepo::open(FLUX, &online(&cache, "http://127.0.0.1:9")).unwrap();
    assert_eq!(repo.list().unwrap(), ["model_index.json"]);
    assert!(repo.exists("model_index.json").unwrap());
    assert_eq!(read(&repo.file("model_index.json").unwrap()), "{}");
}

fn flux_on_fake_hub() -> FakeRepo {
    FakeRepo::new(FLUX, COMMIT)
        .file(
            "model_index.json",
            b"{\"_class_name\": \"FluxFillPipeline\"}",
        )
        .file("transformer/config.json", b"{\"in_channels\": 384}")
        .file(
            "transformer/diffusion_pytorch_model.safetensors.index.json",
            br#"{"weight_map": {"a": "diffusion_pytorch_model-00002-of-00002.safetensors",
                                "b": "diffusion_pytorch_model-00001-of-00002.safetensors"}}"#,
        )
        .file(
            "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
            b"shard one",
        )
        .file(
            "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
            b"shard two",
        )
}

#[test]
fn downloads_land_in_the_standard_cache() {
    skip_behind_proxy!();
    let hub = FakeHub::start(flux_on_fake_hub());
    let cache = FakeCache::new();
    let repo = ModelRepo::open(FLUX, &online(&cache, &hub.endpoint)).unwrap();

    assert!(
        repo.exists("transformer/config.json").unwrap(),
        "from the listing"
    );
    assert!(!repo.exists("transformer/nope.json").unwrap());
    assert_eq!(repo.list().unwrap().len(), 5);

    let config = repo.file("transformer/config.json").unwrap();
    assert_eq!(read(&config), "{\"in_channels\": 384}");
    let shards = repo
        .safetensors_set("transformer", "diffusion_pytorch_model")
        .unwrap();
    let contents: Vec<String> = shards.iter().map(|path| read(path)).collect();
    assert_eq!(contents, ["shard one", "shard two"]);

    // The layout huggingface_hub expects: refs/main -> commit, snapshot entries, no leftovers.
    let repo_dir = cache.repo_dir(FLUX);
    assert_eq!(read(&repo_dir.join("refs/main")).trim(), COMMIT);
    assert!(config.starts_with(repo_dir.join("snapshots").join(COMMIT)));
    assert!(partial_files(&repo_dir).is_empty());
    assert!(!hub.any_request_had_token());

    // Offline afterwards: everything comes from the cache.
    let offline = ModelRepo::open(FLUX, &cache.offline()).unwrap();
    assert_eq!(
        offline
            .safetensors_set("transformer", "diffusion_pytorch_model")
            .unwrap(),
        shards
    );

    // Cached files are not fetched again, and the listing is fetched once per handle.
    let before = hub.requests().len();
    repo.file("transformer/config.json").unwrap();
    repo.list().unwrap();
    assert_eq!(hub.requests().len(), before, "{:?}", hub.requests());
}

#[test]
fn files_missing_from_the_repo_are_reported_before_any_download() {
    skip_behind_proxy!();
    let hub = FakeHub::start(flux_on_fake_hub());
    let cache = FakeCache::new();
    let repo = ModelRepo::open(FLUX, &online(&cache, &hub.endpoint)).unwrap();

    let error = repo
        .files(&[
            "transformer/config.json",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
        ])
        .unwrap_err();
    let message = error.to_string();
    let missing = missing_files(error);
    assert_eq!(missing.reason, MissingReason::NotInRepo);
    assert_eq!(
        missing.files,
        ["vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    );
    assert!(message.contains("does not contain them"), "{message}");
    assert!(
        hub.requests()
            .iter()
            .all(|request| !request.contains("/resolve/")),
        "nothing should be downloaded: {:?}",
        hub.requests()
    );
}

#[test]
fn gated_repo_without_token_explains_token_and_license() {
    skip_behind_proxy!();
    let mut gated = flux_on_fake_hub();
    gated.gated = true;
    let hub = FakeHub::start(gated);
    let cache = FakeCache::new();
    let repo = ModelRepo::open(FLUX, &online(&cache, &hub.endpoint)).unwrap();

    let error = repo
        .files(&["model_index.json", "transformer/config.json"])
        .unwrap_err();
    let message = error.to_string();
    let missing = missing_files(error);
    assert_eq!(missing.reason, MissingReason::Gated { token_set: false });
    assert_eq!(
        missing.files,
        ["model_index.json", "transformer/config.json"]
    );
    for expected in [
        "gated",
        "no token is set",
        "HF_TOKEN",
        "huggingface-cli login",
        &format!("accept the license at {}/{FLUX}", hub.endpoint),
        "Please log in",
    ] {
        assert!(
            message.contains(expected),
            "missing `{expected}` in:\n{message}"
        );
    }

    // With a token the same repo downloads, and the token is sent.
    let with_token = online(&cache, &hub.endpoint).with_token(Some("hf_test".to_string()));
    let repo = ModelRepo::open(FLUX, &with_token).unwrap();
    assert_eq!(read(&repo.file("model_index.json").unwrap()).len(), 35);
    assert!(hub.any_request_had_token());
}

#[test]
fn gated_repo_with_a_token_but_no_accepted_license() {
    skip_behind_proxy!();
    let mut gated = flux_on_fake_hub();
    gated.license_not_accepted = true;
    let hub = FakeHub::start(gated);
    let cache = FakeCache::new();
    let options = online(&cache, &hub.endpoint).with_token(Some("hf_test".to_string()));
    let repo = ModelRepo::open(FLUX, &options).unwrap();

    let missing = missing_files(repo.file("model_index.json").unwrap_err());
    assert_eq!(missing.reason, MissingReason::Gated { token_set: true });
    assert!(missing.to_string().contains("has not accepted the license"));
}

#[test]
fn unknown_repo_and_revision_are_told_apart() {
    skip_behind_proxy!();
    let hub = FakeHub::start(flux_on_fake_hub());
    let cache = FakeCache::new();

    let typo = ModelRepo::open(
        "black-forest-labs/FLUX.1-Fil-dev",
        &online(&cache, &hub.endpoint),
    )
    .unwrap();
    let missing = missing_files(typo.file("model_index.json").unwrap_err());
    assert_eq!(
        missing.reason,
        MissingReason::RepoNotFound { token_set: false }
    );
    assert!(missing.to_string().contains("check the repo id"));

    let bad_revision =
        ModelRepo::open(&format!("{FLUX}@v9"), &online(&cache, &hub.endpoint)).unwrap();
    let missing = missing_files(bad_revision.list().unwrap_err());
    assert_eq!(missing.reason, MissingReason::RevisionNotFound);
    assert!(missing.to_string().contains("`v9`"));
}

#[test]
fn a_dropped_download_leaves_no_partial_file() {
    skip_behind_proxy!();
    let big = vec![b'x'; 64 * 1024];
    let repo_spec = FakeRepo::new(FLUX, COMMIT)
        .file("model_index.json", b"{}")
        .broken_file("vae/diffusion_pytorch_model.safetensors", &big, 1000);
    let hub = FakeHub::start(repo_spec);
    let cache = FakeCache::new();
    let repo_dir = cache.repo_dir(FLUX);
    // A partial download from an earlier run (or another program): not ours, so it stays.
    std::fs::create_dir_all(repo_dir.join("blobs")).unwrap();
    std::fs::write(repo_dir.join("blobs/earlier.part"), b"half").unwrap();

    let repo = ModelRepo::open(FLUX, &online(&cache, &hub.endpoint)).unwrap();
    let error = repo
        .files(&[
            "model_index.json",
            "vae/diffusion_pytorch_model.safetensors",
        ])
        .unwrap_err();
    let missing = missing_files(error);
    assert_eq!(missing.reason, MissingReason::Network);
    assert_eq!(missing.files, ["vae/diffusion_pytorch_model.safetensors"]);

    assert_eq!(
        partial_files(&repo_dir).into_iter().collect::<Vec<_>>(),
        ["earlier.part"]
    );
    let snapshot_files = common::walk(&repo_dir.join("snapshots"));
    assert_eq!(snapshot_files, [format!("{COMMIT}/model_index.json")]);
    // What did arrive completely stays usable.
    assert_eq!(read(&repo.file("model_index.json").unwrap()), "{}");
}
