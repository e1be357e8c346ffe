//! Model specs and environment-derived options; no network, no real environment.

use std::collections::HashMap;
use std::path::PathBuf;

use icedit_hub::{HubError, HubOptions, ModelSource, DEFAULT_ENDPOINT};

fn hub(repo_id: &str, revision: &str) -> ModelSource {
    ModelSource::Hub {
        repo_id: repo_id.to_string(),
        revision: revision.to_string(),
    }
}

#[test]
fn repo_ids_parse_with_and_without_revision() {
    let flux = "black-forest-labs/FLUX.1-Fill-dev";
    assert_eq!(ModelSource::parse(flux).unwrap(), hub(flux, "main"));
    assert_eq!(
        ModelSource::parse(&format!("{flux}@v1.0")).unwrap(),
        hub(flux, "v1.0")
    );
    assert_eq!(
        ModelSource::parse(&format!("{flux}@refs/pr/12")).unwrap(),
        hub(flux, "refs/pr/12")
    );
    assert_eq!(
        ModelSource::parse("hf:owner/name_2@abc").unwrap(),
        hub("owner/name_2", "abc")
    );
    assert_eq!(hub(flux, "main").to_string(), format!("{flux}@main"));
}

#[test]
fn existing_folder_is_local_even_if_it_looks_like_a_repo_id() {
    let temp = tempfile::tempdir().unwrap();
    let folder = temp.path().join("owner").join("name");
    std::fs::create_dir_all(&folder).unwrap();
    let spec = folder.to_str().unwrap();
    assert_eq!(
        ModelSource::parse(spec).unwrap(),
        ModelSource::Local(folder.clone())
    );

    // The `hf:` prefix forces the Hub reading.
    assert_eq!(
        ModelSource::parse("hf:owner/name").unwrap(),
        hub("owner/name", "main")
    );
}

#[test]
fn missing_paths_say_the_path_does_not_exist_and_what_a_repo_id_is() {
    for spec in ["./no/such/model", "/no/such/model", "../nope", "~/nope"] {
        let error = ModelSource::parse(spec).unwrap_err();
        assert!(
            matches!(error, HubError::PathNotFound { .. }),
            "{spec}: {error:?}"
        );
        let message = error.to_string();
        assert!(message.contains("does not exist"), "{message}");
        assert!(message.contains("owner/name"), "{message}");
    }
}

#[test]
fn specs_that_are_neither_path_nor_repo_id_are_rejected() {
    let cases = [
        "",
        "just-a-name",
        "a/b/c",
        "owner/",
        "/name",
        "-owner/name",
        "owner/name-",
        "own--er/name",
        "owner/na..me",
        "owner/name@",
        "owner/name@../../etc",
        "owner/name@a b",
        "owner/ná",
        "hf:",
        "hf:just-a-name",
    ];
    for spec in cases {
        let error = ModelSource::parse(spec).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("owner/name"),
            "`{spec}` should explain repo ids: {message}"
        );
        if !spec.is_empty() && !spec.starts_with("hf:") && !spec.starts_with('/') {
            assert!(
                message.contains("no file or folder exists"),
                "`{spec}` should say the path does not exist: {message}"
            );
        }
    }
}

#[test]
fn a_file_is_not_a_model_folder() {
    let temp = tempfile::tempdir().unwrap();
    let file = temp.path().join("model.safetensors");
    std::fs::write(&file, b"x").unwrap();
    let error = ModelSource::parse(file.to_str().unwrap()).unwrap_err();
    assert!(matches!(error, HubError::NotAFolder { .. }), "{error:?}");
}

/// `from_env_with` over a fixed map, so nothing depends on the real environment.
fn options_from(vars: &[(&str, &str)]) -> HubOptions {
    let vars: HashMap<String, String> = vars
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
    HubOptions::from_env_with(|name| vars.get(name).cloned())
}

#[test]
fn cache_dir_precedence_follows_huggingface_hub() {
    let home = "/home/someone";
    let defaults = options_from(&[("HOME", home)]);
    assert_eq!(
        defaults.cache_dir,
        PathBuf::from("/home/someone/.cache/huggingface/hub")
    );
    assert_eq!(defaults.token, None);
    assert!(!defaults.offline);
    assert!(defaults.progress);
    assert_eq!(defaults.endpoint, DEFAULT_ENDPOINT);

    let xdg = options_from(&[("HOME", home), ("XDG_CACHE_HOME", "/xdg")]);
    assert_eq!(xdg.cache_dir, PathBuf::from("/xdg/huggingface/hub"));

    let hf_home = options_from(&[
        ("HOME", home),
        ("XDG_CACHE_HOME", "/xdg"),
        ("HF_HOME", "/hf"),
    ]);
    assert_eq!(hf_home.cache_dir, PathBuf::from("/hf/hub"));

    let hub_cache = options_from(&[
        ("HOME", home),
        ("HF_HOME", "/hf"),
        ("HF_HUB_CACHE", "/models"),
    ]);
    assert_eq!(hub_cache.cache_dir, PathBuf::from("/models"));

    let tilde = options_from(&[("HOME", home), ("HF_HUB_CACHE", "~/models")]);
    assert_eq!(tilde.cache_dir, PathBuf::from("/home/someone/models"));

    // Empty variables count as unset.
    let empty = options_from(&[("HOME", home), ("HF_HOME", ""), ("HF_HUB_CACHE", "")]);
    assert_eq!(empty.cache_dir, defaults.cache_dir);
}

#[test]
fn token_comes_from_env_then_token_file() {
    let temp = tempfile::tempdir().unwrap();
    let home = temp.path().join("home");
    let hf_home = temp.path().join("hf");
    std::fs::create_dir_all(home.join(".cache/huggingface")).unwrap();
    std::fs::create_dir_all(&hf_home).unwrap();
    std::fs::write(home.join(".cache/huggingface/token"), "hf_default\n").unwrap();
    std::fs::write(hf_home.join("token"), "  hf_from_hf_home  \n").unwrap();
    let custom = temp.path().join("custom-token");
    std::fs::write(&custom, "hf_custom").unwrap();
    let home = home.to_str().unwrap();
    let hf_home = hf_home.to_str().unwrap();
    let custom = custom.to_str().unwrap();

    let token = |vars: &[(&str, &str)]| options_from(vars).token;
    assert_eq!(token(&[("HOME", home)]).as_deref(), Some("hf_default"));
    assert_eq!(
        token(&[("HOME", home), ("HF_HOME", hf_home)]).as_deref(),
        Some("hf_from_hf_home")
    );
    assert_eq!(
        token(&[
            ("HOME", home),
            ("HF_HOME", hf_home),
            ("HF_TOKEN_PATH", custom)
        ])
        .as_deref(),
        Some("hf_custom")
    );
    assert_eq!(
        token(&[
            ("HOME", home),
            ("HF_TOKEN_PATH", custom),
            ("HF_TOKEN", " hf_env ")
        ])
        .as_deref(),
        Some("hf_env")
    );
    assert_eq!(
        token(&[("HOME", home), ("HUGGING_FACE_HUB_TOKEN", "hf_legacy")]).as_deref(),
        Some("hf_legacy")
    );
    // HF_HUB_CACHE moves the cache, not the token file.
    assert_eq!(
        token(&[("HOME", home), ("HF_HUB_CACHE", "/elsewhere")]).as_deref(),
        Some("hf_default")
    );

    let empty_file = temp.path().join("empty-token");
    std::fs::write(&empty_file, "\n").unwrap();
    let empty_file = empty_file.to_str().unwrap();
    assert_eq!(
        token(&[("HOME", "/nowhere"), ("HF_TOKEN_PATH", empty_file)]),
        None
    );
    assert_eq!(token(&[("HOME", "/nowhere")]), None);
}

#[test]
fn offline_endpoint_and_progress_flags() {
    for value in ["1", "true", "TRUE", "yes", "on"] {
        assert!(
            options_from(&[("HF_HUB_OFFLINE", value)]).offline,
            "{value}"
        );
    }
    for value in ["0", "false", "no", ""] {
        assert!(
            !options_from(&[("HF_HUB_OFFLINE", value)]).offline,
            "{value}"
        );
    }
    assert!(options_from(&[("TRANSFORMERS_OFFLINE", "1")]).offline);

    let mirror = options_from(&[("HF_ENDPOINT", "https://hf-mirror.example/")]);
    assert_eq!(mirror.endpoint, "https://hf-mirror.example");

    assert!(!options_from(&[("HF_HUB_DISABLE_PROGRESS_BARS", "1")]).progress);
}

#[test]
fn builder_methods_and_debug_hides_the_token() {
    let options = HubOptions::new("/cache")
        .with_token(Some("hf_secret".to_string()))
        .with_offline(true)
        .with_endpoint("http://localhost:1234/")
        .with_progress(true)
        .with_download_retries(0);
    assert_eq!(options.cache_dir, PathBuf::from("/cache"));
    assert_eq!(options.token.as_deref(), Some("hf_secret"));
    assert!(options.offline);
    assert_eq!(options.endpoint, "http://localhost:1234");
    assert_eq!(options.download_retries, 0);
    let debug = format!("{options:?}");
    assert!(!debug.contains("hf_secret"), "{debug}");
    assert!(debug.contains("redacted"), "{debug}");

    assert_eq!(
        HubOptions::new("/c").with_token(Some("  ".into())).token,
        None
    );
}
