//! `icedit judge`: one comparison with each kind of judge (the tiny CLIP and Qwen3-VL models of
//! tests/fixtures, a scripted local server), and its bad-input errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use icedit_judge::fake_server::{serve, Reply};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn icedit(args: &[&str]) -> Output {
    let home = tempfile::tempdir().unwrap();
    Command::new(env!("CARGO_BIN_EXE_icedit"))
        .arg("judge")
        .args(args)
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_TOKEN")
        .env_remove("ICEDIT_JUDGE_API_KEY")
        .env_remove("OPENAI_API_KEY")
        .output()
        .unwrap()
}

fn stderr(run: &Output) -> String {
    String::from_utf8_lossy(&run.stderr).into_owned()
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
