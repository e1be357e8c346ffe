//! A hostile (or tampered-with) Hub on localhost: headers that name paths, commits that
//! are not commits, bodies that are not what was announced, redirects to other schemes.
//! Each must end in an error that names the problem, never a panic, and nothing may be
//! written outside the cache folder, nor kept in it for the refused file.
//! Nothing here leaves the machine; with a proxy configured the tests skip themselves.

mod common;

use std::path::{Path, PathBuf};

use common::{
    fake_etag, partial_files, proxy_configured, read, resolve_requests, walk, FakeCache, FakeHub,
    FakeRepo, Hostile, FLUX,
};
use icedit_hub::{HubError, HubOptions, MissingReason, ModelRepo, UntrustedResponse};

const COMMIT: &str = "5555555555555555555555555555555555555555";
const FILE: &str = "transformer/config.json";
const CONTENTS: &[u8] = b"{\"in_channels\": 384}";

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

/// A name no other test (or process) uses, for escape targets.
fn unique(tag: &str) -> String {
    format!("icedit-escape-{tag}-{}", std::process::id())
}

/// Every place `blobs/` + `../` * n + `name` (or a snapshot folder named so) could land.
fn escape_targets(cache: &FakeCache, name: &str) -> Vec<PathBuf> {
    let start = cache.repo_dir(FLUX).join("snapshots");
    let mut dir: Option<&Path> = Some(&start);
    let mut targets = Vec::new();
    while let Some(here) = dir {
        targets.push(here.join(name));
        dir = here.parent();
    }
    targets.push(std::env::temp_dir().join(name));
    targets
}

/// Serves `FILE` with the given hostile answers, asks for it, and returns the error.
fn fetch_hostile(hostile: Hostile) -> (HubError, FakeCache, FakeHub) {
    let hub = FakeHub::start(FakeRepo::new(FLUX, COMMIT).hostile_file(FILE, CONTENTS, hostile));
    let cache = FakeCache::new();
    let repo = ModelRepo::open(FLUX, &online(&cache, &hub.endpoint)).unwrap();
    let error = repo.file(FILE).unwrap_err();
    (error, cache, hub)
}

fn untrusted(error: HubError) -> UntrustedResponse {
    match error {
        HubError::UntrustedResponse(untrusted) => *untrusted,
        other => panic!("expected UntrustedResponse, got {other:?}"),
    }
}

/// Nothing at all was kept: no blob, no snapshot entry, no ref, no partial file; the
/// temp folder holds only the (empty) cache; no file at any escape target.
fn assert_nothing_written(cache: &FakeCache, escape_name: &str) {
    assert_eq!(
        walk(cache.root()),
        Vec::<String>::new(),
        "files were written"
    );
    let top: Vec<String> = std::fs::read_dir(cache.root())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(top.is_empty() || top == ["hub"], "{top:?}");
    if let Ok(entries) = std::fs::read_dir(cache.dir()) {
        let names: Vec<String> = entries
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, [format!("models--{}", FLUX.replace('/', "--"))]);
    }
    let snapshots = cache.repo_dir(FLUX).join("snapshots");
    if let Ok(entries) = std::fs::read_dir(&snapshots) {
        assert_eq!(entries.count(), 0, "a snapshot folder was made");
    }
    for target in escape_targets(cache, escape_name) {
        assert!(!target.exists(), "{} exists", target.display());
    }
}

fn assert_mentions(message: &str, expected: &[&str]) {
    for expected in expected {
        assert!(
            message.contains(expected),
            "missing `{expected}` in:\n{message}"
        );
    }
}

#[test]
fn etags_that_climb_out_of_the_cache_are_refused() {
    skip_behind_proxy!();
    let name = unique("etag");
    for etag in [
        format!("\"../../{name}\""),
        format!("\"../../../../../{name}\""),
        format!("W/\"../../{name}\""),
        "\"abc/def\"".to_string(),
        format!("\"/{}\"", std::env::temp_dir().join(&name).display()),
        "\"..\"".to_string(),
        "\"abc\\\\def\"".to_string(),
    ] {
        let (error, cache, _hub) = fetch_hostile(Hostile {
            etag: Some(etag.clone()),
            ..Hostile::default()
        });
        let message = error.to_string();
        let refused = untrusted(error);
        assert_eq!(refused.file.as_deref(), Some(FILE), "{etag}");
        assert_eq!(refused.field, "the ETag header");
        assert_eq!(refused.repo_id, FLUX);
        assert!(
            refused.problem.contains("path separator or `..`"),
            "{etag}: {message}"
        );
        assert_mentions(&message, &[FILE, FLUX, "ETag", "HF_ENDPOINT", "refused"]);
        assert_nothing_written(&cache, &name);
    }
}

#[test]
fn a_linked_etag_is_checked_before_the_etag() {
    skip_behind_proxy!();
    let name = unique("linked");
    let (error, cache, _hub) = fetch_hostile(Hostile {
        linked_etag: Some(format!("\"../{name}\"")),
        ..Hostile::default()
    });
    let refused = untrusted(error);
    assert_eq!(refused.field, "the X-Linked-Etag header");
    assert!(refused.value.contains(&name));
    assert_nothing_written(&cache, &name);
}

#[test]
fn etags_that_are_not_hashes_are_refused() {
    skip_behind_proxy!();
    for (etag, problem) in [
        ("\"\"", "is empty"),
        ("\"a.b\"", "is not a hash"),
        ("\"a\tb\"", "is not a hash"),
        (&*format!("\"{}\"", "f".repeat(200)), "too long"),
    ] {
        let (error, cache, _hub) = fetch_hostile(Hostile {
            etag: Some(etag.to_string()),
            ..Hostile::default()
        });
        let message = error.to_string();
        assert!(message.contains(problem), "{etag}: {message}");
        // Shown escaped and shortened.
        assert!(!message.contains('\t'), "{message}");
        assert!(!message.contains(&"f".repeat(100)), "{message}");
        assert_nothing_written(&cache, "unused");
    }
}

#[test]
fn commits_that_are_not_commit_hashes_are_refused() {
    skip_behind_proxy!();
    let name = unique("commit");
    for commit in [
        format!("../../../{name}"),
        format!("../{}", &COMMIT[..37]),
        "z".repeat(40),
        "abc123".to_string(),
        format!("{COMMIT}5"),
        COMMIT.to_uppercase().replace('5', "A"),
    ] {
        let (error, cache, _hub) = fetch_hostile(Hostile {
            commit: Some(commit.clone()),
            ..Hostile::default()
        });
        let message = error.to_string();
        let refused = untrusted(error);
        assert_eq!(refused.field, "the X-Repo-Commit header", "{commit}");
        assert!(refused.problem.contains("not a commit hash"), "{message}");
        assert_mentions(&message, &[FILE, FLUX, "X-Repo-Commit", "40"]);
        assert_nothing_written(&cache, &name);
    }
}

#[test]
fn a_commit_other_than_the_runs_commit_is_refused() {
    skip_behind_proxy!();
    let other = "6666666666666666666666666666666666666666";
    let (error, cache, _hub) = fetch_hostile(Hostile {
        commit: Some(other.to_string()),
        ..Hostile::default()
    });
    let message = error.to_string();
    assert_mentions(&message, &[other, COMMIT, "differs"]);
    assert_nothing_written(&cache, "unused");
}

#[test]
fn a_repo_info_commit_that_is_not_a_hash_is_refused() {
    skip_behind_proxy!();
    let name = unique("sha");
    let hub = FakeHub::start(FakeRepo::new(FLUX, &format!("../../{name}")).file(FILE, CONTENTS));
    let cache = FakeCache::new();
    let repo = ModelRepo::open(FLUX, &online(&cache, &hub.endpoint)).unwrap();
    let error = repo.file(FILE).unwrap_err();
    let message = error.to_string();
    let refused = untrusted(error);
    assert_eq!(refused.file, None);
    assert!(refused.field.contains("sha"), "{message}");
    assert_mentions(&message, &["the info of Hugging Face repo", FLUX, &name]);
    // The handle keeps refusing, and never downloads.
    assert!(matches!(repo.list(), Err(HubError::UntrustedResponse(_))));
    assert!(matches!(
        repo.exists(FILE),
        Err(HubError::UntrustedResponse(_))
    ));
    assert_eq!(repo.commit(), None);
    assert!(resolve_requests(&hub, "GET").is_empty());
    assert_nothing_written(&cache, &name);
}

#[test]
fn weak_etags_are_accepted_and_normalised() {
    skip_behind_proxy!();
    let sha256 = "a".repeat(64);
    for (hostile, blob) in [
        (
            Hostile {
                etag: Some(format!("W/\"{}\"", fake_etag(CONTENTS))),
                ..Hostile::default()
            },
            fake_etag(CONTENTS),
        ),
        // An LFS file: the linked ETag (the sha256) names the blob, as in huggingface_hub.
        (
            Hostile {
                etag: Some("W/\"0123abcd\"".to_string()),
                linked_etag: Some(format!("\"{sha256}\"")),
                ..Hostile::default()
            },
            sha256.clone(),
        ),
    ] {
        let hub = FakeHub::start(FakeRepo::new(FLUX, COMMIT).hostile_file(FILE, CONTENTS, hostile));
        let cache = FakeCache::new();
        let repo = ModelRepo::open(FLUX, &online(&cache, &hub.endpoint)).unwrap();
        let path = repo.file(FILE).unwrap();
        assert_eq!(read(&path).as_bytes(), CONTENTS);
        let repo_dir = cache.repo_dir(FLUX);
        assert_eq!(path, repo_dir.join("snapshots").join(COMMIT).join(FILE));
        assert_eq!(
            walk(&repo_dir),
            [
                format!("blobs/{blob}"),
                "refs/main".to_string(),
                format!("snapshots/{COMMIT}/{FILE}"),
            ]
        );
        #[cfg(unix)]
        assert_eq!(
            std::fs::read_link(&path).unwrap(),
            Path::new("../../../blobs").join(&blob)
        );
    }
}

#[test]
fn a_short_body_is_an_error_and_leaves_no_blob() {
    skip_behind_proxy!();
    let big = vec![b'x'; 64 * 1024];
    let hub = FakeHub::start(
        FakeRepo::new(FLUX, COMMIT)
            .file("model_index.json", b"{}")
            .broken_file(FILE, &big, 1000),
    );
    let cache = FakeCache::new();
    // Two resumes, each cut short again.
    let options = online(&cache, &hub.endpoint).with_download_retries(2);
    let repo = ModelRepo::open(FLUX, &options).unwrap();
    let error = repo.files(&["model_index.json", FILE]).unwrap_err();
    let message = error.to_string();
    let HubError::MissingFiles(missing) = error else {
        panic!("expected MissingFiles: {message}");
    };
    assert_eq!(missing.reason, MissingReason::Network);
    assert_eq!(missing.files, [FILE]);
    assert_mentions(&message, &["broke off after 3000 of 65536 bytes", FILE]);

    let repo_dir = cache.repo_dir(FLUX);
    assert!(partial_files(&repo_dir).is_empty());
    assert_eq!(
        walk(&repo_dir),
        [
            format!("blobs/{}", fake_etag(b"{}")),
            "refs/main".to_string(),
            format!("snapshots/{COMMIT}/model_index.json"),
        ]
    );
    assert_eq!(
        walk(cache.root()).len(),
        3,
        "nothing outside the repo folder"
    );
}

#[test]
fn a_broken_transfer_resumes_where_it_stopped() {
    skip_behind_proxy!();
    let contents: Vec<u8> = (0..5000u32).map(|n| (n % 251) as u8).collect();
    let hub = FakeHub::start(FakeRepo::new(FLUX, COMMIT).broken_file(FILE, &contents, 1000));
    let cache = FakeCache::new();
    let options = online(&cache, &hub.endpoint).with_download_retries(5);
    let repo = ModelRepo::open(FLUX, &options).unwrap();
    let path = repo.file(FILE).unwrap();
    assert_eq!(std::fs::read(path).unwrap(), contents);
    assert_eq!(resolve_requests(&hub, "GET").len(), 5);
    assert!(partial_files(&cache.repo_dir(FLUX)).is_empty());
}

#[test]
fn a_body_other_than_the_announced_size_is_refused() {
    skip_behind_proxy!();
    for size in ["999999", "3"] {
        let (error, cache, _hub) = fetch_hostile(Hostile {
            linked_size: Some(size.to_string()),
            ..Hostile::default()
        });
        let message = error.to_string();
        assert_mentions(&message, &["Content-Length", size, "does not match", FILE]);
        assert!(partial_files(&cache.repo_dir(FLUX)).is_empty());
        assert_nothing_written(&cache, "unused");
    }
    let (error, _, _) = fetch_hostile(Hostile {
        linked_size: Some("-1".to_string()),
        ..Hostile::default()
    });
    assert_mentions(&error.to_string(), &["X-Linked-Size", "not a byte count"]);
}

#[test]
fn redirects_to_other_schemes_are_refused() {
    skip_behind_proxy!();
    for (location, get_only, scheme) in [
        ("file:///etc/passwd", false, "`file:`"),
        ("file:///etc/passwd", true, "`file:`"),
        ("ftp://127.0.0.1/x", false, "`ftp:`"),
        ("ftp://127.0.0.1/x", true, "`ftp:`"),
        ("gopher://127.0.0.1/x", true, "`gopher:`"),
        ("data:text/plain,hello", true, "`data:`"),
    ] {
        let (error, cache, hub) = fetch_hostile(Hostile {
            location: Some(location.to_string()),
            redirect_get_only: get_only,
            linked_size: Some(CONTENTS.len().to_string()),
            ..Hostile::default()
        });
        let message = error.to_string();
        let refused = untrusted(error);
        assert_eq!(refused.field, "a redirect (Location header)");
        assert_mentions(&message, &[location, scheme, "only http and https", FILE]);
        assert_nothing_written(&cache, "unused");
        let gets = resolve_requests(&hub, "GET").len();
        assert_eq!(
            gets,
            usize::from(get_only),
            "{location}: {:?}",
            hub.requests()
        );
    }
}

#[test]
fn a_redirect_to_a_cdn_is_followed_without_the_token() {
    skip_behind_proxy!();
    // The CDN is another origin (another port): it serves the contents at /cdn/{name}.
    let cdn = FakeHub::start(FakeRepo::new(FLUX, COMMIT).file(FILE, CONTENTS));
    let hub = FakeHub::start(FakeRepo::new(FLUX, COMMIT).hostile_file(
        FILE,
        CONTENTS,
        Hostile {
            location: Some(format!("{}/cdn/{FILE}", cdn.endpoint)),
            linked_etag: Some(format!("\"{}\"", "b".repeat(64))),
            linked_size: Some(CONTENTS.len().to_string()),
            ..Hostile::default()
        },
    ));
    let cache = FakeCache::new();
    let options = online(&cache, &hub.endpoint).with_token(Some("hf_secret".to_string()));
    let repo = ModelRepo::open(FLUX, &options).unwrap();
    let path = repo.file(FILE).unwrap();
    assert_eq!(read(&path).as_bytes(), CONTENTS);
    assert!(cache
        .repo_dir(FLUX)
        .join("blobs")
        .join("b".repeat(64))
        .is_file());
    assert!(hub.any_request_had_token());
    assert_eq!(cdn.requests(), [format!("GET /cdn/{FILE}")]);
    assert!(
        !cdn.any_request_had_token(),
        "the token went to another origin"
    );
}
