//! One commit per run: the branch is revalidated with the Hub once per handle, stale refs
//! are updated, all files come from that commit's snapshot, blobs already cached are
//! reused without downloading them again, and offline mode never asks the Hub.
//! Nothing here leaves the machine; with a proxy configured the tests skip themselves.

mod common;

use common::{
    fake_etag, proxy_configured, read, resolve_requests, FakeCache, FakeHub, FakeRepo, FLUX,
};
use icedit_hub::{HubError, HubOptions, MissingReason, ModelRepo};

const OLD: &str = "7777777777777777777777777777777777777777";
const NEW: &str = "8888888888888888888888888888888888888888";

macro_rules! skip_behind_proxy {
    () => {
        if proxy_configured() {
            eprintln!("skipped: a proxy is configured, requests could leave the machine");
            return;
        }
    };
}

fn online(cache: &FakeCache, endpoint: &str) -> HubOptions {
    HubOptions::new(cache.dir())
        .with_endpoint(endpoint)
        .with_download_retries(0)
}

/// A cache whose `refs/main` still says OLD, with two files of OLD.
fn stale_cache() -> FakeCache {
    let cache = FakeCache::new();
    cache.add(FLUX, OLD, "model_index.json", b"old index");
    cache.add(FLUX, OLD, "transformer/config.json", b"old config");
    cache.set_ref(FLUX, "main", OLD);
    cache
}

#[test]
fn a_stale_ref_is_revalidated_and_files_come_from_the_new_commit() {
    skip_behind_proxy!();
    let cache = stale_cache();
    let hub = FakeHub::start(
        FakeRepo::new(FLUX, NEW)
            .file("model_index.json", b"new index")
            .file("transformer/config.json", b"new config")
            .file("vae/config.json", b"new vae"),
    );
    let repo = ModelRepo::open(FLUX, &online(&cache, &hub.endpoint)).unwrap();
    assert_eq!(repo.commit().as_deref(), Some(NEW));
    assert_eq!(repo.describe_commit(), format!("{FLUX}@{NEW}"));
    assert_eq!(repo.describe(), format!("{FLUX}@main"));

    // Both files were cached at OLD: neither is taken from there, none is mixed in.
    let paths = repo
        .files(&[
            "model_index.json",
            "transformer/config.json",
            "vae/config.json",
        ])
        .unwrap();
    let contents: Vec<String> = paths.iter().map(|path| read(path)).collect();
    assert_eq!(contents, ["new index", "new config", "new vae"]);
    let snapshot = cache.repo_dir(FLUX).join("snapshots").join(NEW);
    assert!(
        paths.iter().all(|path| path.starts_with(&snapshot)),
        "{paths:?}"
    );
    assert_eq!(
        read(&cache.repo_dir(FLUX).join("refs/main")).trim(),
        NEW,
        "refs/main is updated"
    );

    // The branch was asked about once, for the whole handle.
    let info_requests = hub
        .requests()
        .iter()
        .filter(|line| line.contains("/api/models/"))
        .count();
    assert_eq!(info_requests, 1, "{:?}", hub.requests());
    assert!(resolve_requests(&hub, "HEAD")
        .iter()
        .all(|line| line.contains(&format!("/resolve/{NEW}/"))));

    // The old snapshot is still there; a later offline run uses the new one.
    let offline = ModelRepo::open(FLUX, &cache.offline()).unwrap();
    assert_eq!(offline.commit().as_deref(), Some(NEW));
    assert_eq!(
        read(&offline.file("model_index.json").unwrap()),
        "new index"
    );
    let pinned_old = ModelRepo::open(&format!("{FLUX}@{OLD}"), &cache.offline()).unwrap();
    assert_eq!(
        read(&pinned_old.file("model_index.json").unwrap()),
        "old index"
    );
}

#[test]
fn an_up_to_date_ref_serves_the_cache_after_one_question() {
    skip_behind_proxy!();
    let cache = stale_cache();
    let hub = FakeHub::start(
        FakeRepo::new(FLUX, OLD)
            .file("model_index.json", b"old index")
            .file("transformer/config.json", b"old config"),
    );
    let repo = ModelRepo::open(FLUX, &online(&cache, &hub.endpoint)).unwrap();
    let paths = repo
        .files(&["model_index.json", "transformer/config.json"])
        .unwrap();
    assert_eq!(read(&paths[1]), "old config");
    assert_eq!(repo.commit().as_deref(), Some(OLD));
    assert_eq!(
        hub.requests(),
        [format!("GET /api/models/{FLUX}/revision/main")]
    );
}

#[test]
fn existing_blobs_are_reused_without_downloading() {
    skip_behind_proxy!();
    let cache = stale_cache();
    // NEW changes the index but keeps the config's contents (so its ETag).
    let hub = FakeHub::start(
        FakeRepo::new(FLUX, NEW)
            .file("model_index.json", b"new index")
            .file("transformer/config.json", b"old config"),
    );
    let repo = ModelRepo::open(FLUX, &online(&cache, &hub.endpoint)).unwrap();
    let config = repo.file("transformer/config.json").unwrap();
    assert_eq!(read(&config), "old config");
    assert!(config.starts_with(cache.repo_dir(FLUX).join("snapshots").join(NEW)));
    assert_eq!(resolve_requests(&hub, "HEAD").len(), 1);
    assert_eq!(
        resolve_requests(&hub, "GET"),
        Vec::<String>::new(),
        "the blob was cached: no download"
    );
    #[cfg(unix)]
    assert_eq!(
        std::fs::read_link(&config).unwrap(),
        std::path::Path::new("../../../blobs").join(fake_etag(b"old config"))
    );

    // The changed file is downloaded.
    assert_eq!(read(&repo.file("model_index.json").unwrap()), "new index");
    assert_eq!(resolve_requests(&hub, "GET").len(), 1);
}

#[test]
fn an_unreachable_hub_keeps_the_cached_commit() {
    skip_behind_proxy!();
    let cache = stale_cache();
    let repo = ModelRepo::open(FLUX, &online(&cache, "http://127.0.0.1:9")).unwrap();
    assert_eq!(read(&repo.file("model_index.json").unwrap()), "old index");
    assert_eq!(repo.commit().as_deref(), Some(OLD));
    assert_eq!(repo.describe_commit(), format!("{FLUX}@{OLD}"));
    let error = repo.file("vae/config.json").unwrap_err();
    let HubError::MissingFiles(missing) = error else {
        panic!("expected MissingFiles, got {error:?}");
    };
    assert_eq!(missing.reason, MissingReason::Network);
}

#[test]
fn offline_mode_never_asks_the_hub() {
    skip_behind_proxy!();
    let cache = stale_cache();
    let hub = FakeHub::start(FakeRepo::new(FLUX, NEW).file("model_index.json", b"new index"));
    let options = online(&cache, &hub.endpoint).with_offline(true);
    let repo = ModelRepo::open(FLUX, &options).unwrap();
    assert_eq!(read(&repo.file("model_index.json").unwrap()), "old index");
    assert_eq!(repo.commit().as_deref(), Some(OLD));
    assert!(repo.exists("transformer/config.json").unwrap());
    assert_eq!(repo.list().unwrap().len(), 2);
    let HubError::MissingFiles(missing) = repo.file("vae/config.json").unwrap_err() else {
        panic!("expected MissingFiles");
    };
    assert_eq!(missing.reason, MissingReason::Offline);
    assert_eq!(hub.requests(), Vec::<String>::new());
    assert_eq!(
        read(&cache.repo_dir(FLUX).join("refs/main")).trim(),
        OLD,
        "offline mode leaves refs alone"
    );
}

#[test]
fn local_folders_and_uncached_repos_have_no_commit() {
    let folder = tempfile::tempdir().unwrap();
    let cache = FakeCache::new();
    let local = ModelRepo::open(folder.path().to_str().unwrap(), &cache.offline()).unwrap();
    assert_eq!(local.commit(), None);
    assert_eq!(local.describe_commit(), local.describe());

    let uncached = ModelRepo::open("owner/name@v2", &cache.offline()).unwrap();
    assert_eq!(uncached.commit(), None);
    assert_eq!(uncached.describe_commit(), "owner/name@v2");
}
