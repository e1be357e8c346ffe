//! `icedit judge`: one comparison with each kind of judge (the tiny CLIP and Qwen3-VL models of
//! tests/fixtures, a scripted local server), and its bad-input errors.

use std::path::Path;
use std::process::{Command, Output};

use icedit_judge::fake_server::{serve, Reply};

#[path = "../../../tests/support/cli.rs"]
mod cli_support;
use cli_support::*;
use icedit_test_support::fixtures;

fn icedit(args: &[&str]) -> Output {
    icedit_in(args, &[], None)
}

/// `icedit judge ARGS` with extra environment variables, in `dir` (else the current folder).
fn icedit_in(args: &[&str], env: &[(&str, &str)], dir: Option<&Path>) -> Output {
    let home = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_icedit"));
    command
        .arg("judge")
        .args(args)
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_TOKEN")
        .env_remove("ICEDIT_JUDGE_API_KEY")
        .env_remove("OPENAI_API_KEY")
        .envs(env.iter().copied());
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    command.output().unwrap()
}

/// Runs `icedit judge --json` on images of `set` (a fixture folder) and returns its summary.
fn judge_json(spec: &str, set: &str, [original, first, second]: [&str; 3]) -> serde_json::Value {
    let image = |name: &str| {
        fixtures()
            .join(set)
            .join(format!("images/{name}.png"))
            .display()
            .to_string()
    };
    let args = [
        "--judge".to_string(),
        spec.to_string(),
        "--instruction".into(),
        "make it night".into(),
        "--original".into(),
        image(original),
        image(first),
        image(second),
        "--json".into(),
    ];
    let run = icedit(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(run.status.success(), "{spec}: {}", stderr(&run));
    serde_json::from_slice(&run.stdout).unwrap()
}

#[test]
fn each_judge_gives_its_verdict() {
    // CLIP: the reference scores (tests/fixtures/clip/scores.json) decide.
    let clip = fixtures().join("clip/model");
    let scores: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("clip/scores.json")).unwrap(),
    )
    .unwrap();
    let expected = if scores["second"]["score"].as_f64() > scores["first"]["score"].as_f64() {
        2
    } else {
        1
    };
    let spec = format!("clip:{}", clip.display());
    let summary = judge_json(&spec, "clip", ["source", "first", "second"]);
    assert_eq!(summary["better"], expected, "{summary}");
    assert_eq!(summary["judge"], spec);
    assert!(summary["load_seconds"].as_f64().unwrap() > 0.0);

    // Qwen3-VL: the reference logits of "1" and "2" decide.
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("qwen3vl/meta.json")).unwrap(),
    )
    .unwrap();
    let spec = format!("qwen3-vl:{}", fixtures().join("qwen3vl/model").display());
    let summary = judge_json(&spec, "qwen3vl", ["original", "first", "second"]);
    assert_eq!(summary["better"], meta["judge_prefers"], "{summary}");
    assert!(summary["answer"].as_str().unwrap().starts_with("P(1)"));

    // A server that answers "Image 2".
    let (url, received) = serve(vec![Reply::Answer("Image 2")]);
    let summary = judge_json(
        &format!("openai:{url}"),
        "clip",
        ["source", "first", "second"],
    );
    assert_eq!(summary["better"], 2);
    assert!(summary["better_image"]
        .as_str()
        .unwrap()
        .ends_with("second.png"));
    assert_eq!(received.lock().unwrap().len(), 1);
}

#[test]
fn bad_requests_fail_with_the_reason() {
    let image = |name: &str| {
        fixtures()
            .join("clip/images")
            .join(name)
            .display()
            .to_string()
    };
    let (source, first, second) = (image("source.png"), image("first.png"), image("second.png"));
    let clip = format!("clip:{}", fixtures().join("clip/model").display());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--instruction", "x", "--original", &source, &first, &second],
            "give --judge",
        ),
        (
            vec![
                "--judge",
                "gpt4",
                "--instruction",
                "x",
                "--original",
                &source,
                &first,
                &second,
            ],
            "unknown judge",
        ),
        (
            vec![
                "--judge",
                &clip,
                "--instruction",
                " ",
                "--original",
                &source,
                &first,
                &second,
            ],
            "--instruction is empty",
        ),
        (
            vec![
                "--judge",
                &clip,
                "--instruction",
                "x",
                "--original",
                "/no/such.png",
                &first,
                &second,
            ],
            "/no/such.png",
        ),
        (
            vec![
                "--judge",
                "qwen3-vl",
                "--instruction",
                "x",
                "--original",
                &source,
                &first,
                &second,
            ],
            "Qwen/Qwen3-VL-2B-Instruct",
        ),
    ];
    for (args, expected) in cases {
        let run = icedit(&args);
        assert_eq!(run.status.code(), Some(1), "{args:?}: {}", stderr(&run));
        assert!(
            stderr(&run).contains(expected),
            "{args:?}: {}",
            stderr(&run)
        );
    }
    // One edit is not a comparison (a usage error).
    let run = icedit(&[
        "--judge",
        &clip,
        "--instruction",
        "x",
        "--original",
        &source,
        &first,
    ]);
    assert_eq!(run.status.code(), Some(2), "{}", stderr(&run));
}

/// The clip fixture's three images: original, first, second.
fn clip_images() -> [String; 3] {
    ["source", "first", "second"].map(|name| {
        fixtures()
            .join(format!("clip/images/{name}.png"))
            .display()
            .to_string()
    })
}

/// A judge URL nothing listens on.
fn refused_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}/v1")
}

#[test]
fn judge_timeouts_and_tries_out_of_range_fail_before_any_work() {
    // The original does not exist: the flag is named first, before anything is read.
    let spec = format!("openai:{}", refused_url());
    let [_, first, second] = clip_images();
    let cases = [
        ("--judge-timeout", "1e20"),
        ("--judge-timeout", "3601"),
        ("--judge-timeout", "0"),
        ("--judge-timeout", "-1"),
        ("--judge-timeout", "nan"),
        ("--judge-timeout", "inf"),
        ("--judge-tries", "0"),
        ("--judge-tries", "11"),
    ];
    for (flag, value) in cases {
        let args = [
            "--judge",
            &spec,
            flag,
            value,
            "--instruction",
            "x",
            "--original",
            "/no/such.png",
            &first,
            &second,
        ];
        let start = std::time::Instant::now();
        let run = icedit(&args);
        assert_eq!(
            run.status.code(),
            Some(1),
            "{flag} {value}: {}",
            stderr(&run)
        );
        assert!(
            stderr(&run).contains(&format!("error: {flag} ")),
            "{flag} {value}: {}",
            stderr(&run)
        );
        assert!(!stderr(&run).contains("panicked"), "{}", stderr(&run));
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
    }
}

#[test]
fn a_judge_setup_without_an_answer_fails_naming_each_judge() {
    let [original, first, second] = clip_images();
    let judge = |spec: &str, extra: &[&str]| {
        let mut args = vec![
            "--judge",
            spec,
            "--instruction",
            "x",
            "--original",
            &original,
            &first,
            &second,
        ];
        args.extend_from_slice(extra);
        let start = std::time::Instant::now();
        let run = icedit(&args);
        let elapsed = start.elapsed();
        assert!(
            elapsed < std::time::Duration::from_secs(15),
            "{spec}: {elapsed:?}"
        );
        run
    };

    // A refused port, even with many tries: a quick, clear failure.
    let refused = refused_url();
    let run = judge(&format!("openai:{refused}#m"), &["--judge-tries", "8"]);
    assert_eq!(run.status.code(), Some(1), "{}", stderr(&run));
    let err = stderr(&run);
    assert!(
        err.contains("error: no judge gave a usable answer"),
        "{err}"
    );
    assert!(err.contains(&format!("openai:{refused}#m")), "{err}");
    assert!(err.contains("connection refused"), "{err}");
    assert!(run.stdout.is_empty(), "no verdict is printed");

    // A redirect to a file, then a server answering garbage: each named with its reason; no
    // panic.
    let (redirect, _) = serve(vec![Reply::Redirect(302, "file:///etc/passwd")]);
    let (garbage, _) = serve(vec![Reply::Raw("<html>502 Bad Gateway</html>")]);
    let run = judge(
        &format!("openai:{redirect},openai:{garbage}"),
        &["--judge-tries", "2", "--judge-timeout", "2"],
    );
    assert_eq!(run.status.code(), Some(1), "{}", stderr(&run));
    let err = stderr(&run);
    assert!(
        err.contains(&format!("openai:{redirect}: HTTP 302")),
        "{err}"
    );
    assert!(err.contains("file://"), "{err}");
    assert!(!err.contains("passwd"), "{err}");
    assert!(
        err.contains(&format!("openai:{garbage}: no usable answer after 2 tries")),
        "{err}"
    );
    assert!(err.contains("not a chat-completions response"), "{err}");

    // A server that never answers: the timeout ends it.
    let (silent, _) = serve(vec![Reply::Silent(std::time::Duration::from_secs(60))]);
    let run = judge(
        &format!("openai:{silent}"),
        &["--judge-tries", "1", "--judge-timeout", "0.5"],
    );
    assert_eq!(run.status.code(), Some(1), "{}", stderr(&run));
    assert!(stderr(&run).contains("timed out"), "{}", stderr(&run));
}

#[test]
fn credentials_in_judge_urls_and_keys_are_never_shown() {
    let (password, key) = ("pa55w0rd-s3cret", "sk-very-secret-key");
    let with_credentials =
        |url: &str| url.replacen("http://", &format!("http://alice:{password}@"), 1);
    let [original, first, second] = clip_images();
    let dir = tempfile::tempdir().unwrap();
    let check = |run: &Output| {
        for text in [
            stderr(run),
            String::from_utf8_lossy(&run.stdout).into_owned(),
        ] {
            for secret in [password, key, "alice"] {
                assert!(!text.contains(secret), "{secret} shown: {text}");
            }
        }
    };

    // An answer, with --json.
    let (url, received) = serve(vec![Reply::Answer("Image 2")]);
    let spec = format!("openai:{}#m", with_credentials(&url));
    let run = icedit_in(
        &[
            "--judge",
            &spec,
            "--instruction",
            "x",
            "--original",
            &original,
            &first,
            &second,
            "--json",
        ],
        &[],
        Some(dir.path()),
    );
    assert!(run.status.success(), "{}", stderr(&run));
    check(&run);
    let summary: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(
        summary["judge"],
        format!("openai:{}#m", url.replacen("http://", "http://***@", 1))
    );
    assert!(received.lock().unwrap()[0]
        .authorization
        .as_deref()
        .unwrap()
        .starts_with("Basic "));

    // Failures: a server echoing the key, a refused port, a redirect carrying the password.
    let (echo, _) = serve(vec![Reply::EchoAuthorization]);
    let location = Box::leak(with_credentials(&refused_url()).into_boxed_str());
    let (redirect, _) = serve(vec![Reply::Redirect(307, location)]);
    let spec = [echo, refused_url(), redirect]
        .map(|url| format!("openai:{}#m", with_credentials(&url)))
        .join(",");
    let run = icedit_in(
        &[
            "--judge",
            &spec,
            "--judge-tries",
            "2",
            "--instruction",
            "x",
            "--original",
            &original,
            &first,
            &second,
            "--json",
        ],
        &[("ICEDIT_JUDGE_API_KEY", key)],
        Some(dir.path()),
    );
    assert_eq!(run.status.code(), Some(1), "{}", stderr(&run));
    check(&run);
    assert!(stderr(&run).contains("Bearer ***"), "{}", stderr(&run));

    // A bad spec with credentials.
    let run = icedit_in(
        &[
            "--judge",
            &format!("opnai:http://alice:{password}@127.0.0.1:9/v1"),
            "--instruction",
            "x",
            "--original",
            &original,
            &first,
            &second,
        ],
        &[],
        Some(dir.path()),
    );
    assert_eq!(run.status.code(), Some(1), "{}", stderr(&run));
    check(&run);

    // Nothing written holds them either.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let text = std::fs::read(entry.unwrap().path()).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        assert!(!text.contains(password) && !text.contains(key));
    }
}
