//! `icedit batch`: a JSON Lines file of edits run with one model load; each image equals
//! `icedit edit` with its seed, a rerun resumes (only what is missing runs), and a bad file is
//! refused with its line before anything is written.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[path = "../../../tests/support/cli.rs"]
mod cli_support;
use cli_support::*;
use icedit_test_support::fixtures;

/// `icedit batch JOBS --out OUT` with the tiny pipeline, no adapter.
pub fn batch(jobs: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_icedit"))
        .arg("batch")
        .arg(jobs)
        .arg("--out")
        .arg(out)
        .args([
            "--model",
            fixtures().join("fill_pipeline/tiny").to_str().unwrap(),
            "--no-lora",
            "--dtype",
            "f32",
            "--max-seq-len",
            "16",
        ])
        .args(extra)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap()
}

const JOBS: &str = r#"{"id": "night", "image": "photo.png", "instruction": "make it night", "seeds": [7, 8], "steps": 3, "width": 64}
# comments and blank lines are skipped

{"image": "photo.png", "instruction": "make it night", "seed": 3, "steps": 3, "width": 64}
"#;

fn edit(dir: &Path, seed: u64) -> PathBuf {
    let out = dir.join(format!("edit-{seed}.png"));
    let run = Command::new(env!("CARGO_BIN_EXE_icedit"))
        .args(strings(&[
            "edit",
            "--model",
            fixtures().join("fill_pipeline/tiny").to_str().unwrap(),
            "--image",
            dir.join("photo.png").to_str().unwrap(),
            "--instruction",
            "make it night",
            "--no-lora",
            "--width",
            "64",
            "--steps",
            "3",
            "--seed",
            &seed.to_string(),
            "--dtype",
            "f32",
            "--max-seq-len",
            "16",
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ]))
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    out
}

#[test]
fn batch_equals_edit_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("edit/source.png"),
        dir.path().join("photo.png"),
    )
    .unwrap();
    let jobs = dir.path().join("jobs.jsonl");
    std::fs::write(&jobs, JOBS).unwrap();
    let out = dir.path().join("out");
    let run = batch(&jobs, &out, &[]);
    assert!(run.status.success(), "{}", stderr(&run));
    for (file, seed) in [("night-7.png", 7), ("night-8.png", 8), ("line-4-3.png", 3)] {
        let expected = edit(dir.path(), seed);
        assert_eq!(max_png_diff(&out.join(file), &expected), 0, "{file}");
        assert_eq!(recipe(&out.join(file))["seed"], seed);
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("night.json")).unwrap()).unwrap();
    assert_eq!(summary["images"].as_array().unwrap().len(), 2);
    assert_eq!(summary["images"][1]["file"], "night-8.png");

    // A rerun after a stop: only the job without its summary runs again.
    let kept = std::fs::metadata(out.join("night-7.png"))
        .unwrap()
        .modified()
        .unwrap();
    std::fs::remove_file(out.join("line-4.json")).unwrap();
    std::fs::remove_file(out.join("line-4-3.png")).unwrap();
    let run = batch(&jobs, &out, &[]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(
        stderr(&run).contains("1 of 2 jobs already done"),
        "{}",
        stderr(&run)
    );
    assert!(out.join("line-4-3.png").is_file());
    let now = std::fs::metadata(out.join("night-7.png"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(kept, now, "a done job is not run again");
}

#[test]
fn bad_jobs_files_are_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("edit/source.png"),
        dir.path().join("photo.png"),
    )
    .unwrap();
    let good = r#"{"id": "a", "image": "photo.png", "instruction": "x", "steps": 2, "width": 64}"#;
    let cases = [
        ("{not json", "line 1"),
        (
            r#"{"image": "photo.png", "instruction": "x", "strength": 1}"#,
            "unknown field",
        ),
        (
            r#"{"image": "missing.png", "instruction": "x"}"#,
            "no image at",
        ),
        (r#"{"image": "photo.png", "instruction": "  "}"#, "empty"),
        (
            r#"{"id": "../up", "image": "photo.png", "instruction": "x"}"#,
            "names files",
        ),
        (
            r#"{"image": "photo.png", "instruction": "x", "seed": 1, "seeds": [2]}"#,
            "not both",
        ),
        (
            r#"{"image": "photo.png", "instruction": "x", "n": 2, "seeds": [2]}"#,
            "not both",
        ),
        (
            r#"{"image": "photo.png", "instruction": "x", "n": 0}"#,
            "n must be",
        ),
        (
            r#"{"image": "photo.png", "instruction": "x", "steps": 0}"#,
            "steps",
        ),
        ("", "no jobs"),
    ];
    for (line, expected) in cases {
        let jobs = dir.path().join("jobs.jsonl");
        std::fs::write(&jobs, line).unwrap();
        let out = dir.path().join("out");
        let run = batch(&jobs, &out, &["--quiet"]);
        assert_eq!(run.status.code(), Some(1), "{line}");
        assert!(stderr(&run).contains(expected), "{line}: {}", stderr(&run));
        assert!(
            !out.join("a.json").exists()
                && std::fs::read_dir(&out).map_or(true, |d| d.count() == 0),
            "{line}: nothing written"
        );
    }
    // The same id twice, and an output that would replace an input.
    let jobs = dir.path().join("jobs.jsonl");
    std::fs::write(&jobs, format!("{good}\n{good}\n")).unwrap();
    let run = batch(&jobs, &dir.path().join("out"), &["--quiet"]);
    assert!(stderr(&run).contains("earlier line"), "{}", stderr(&run));
    std::fs::copy(dir.path().join("photo.png"), dir.path().join("a-0.png")).unwrap();
    std::fs::write(
        &jobs,
        r#"{"id": "a", "image": "a-0.png", "instruction": "x", "steps": 2, "width": 64}"#,
    )
    .unwrap();
    let run = batch(&jobs, dir.path(), &["--quiet"]);
    assert_eq!(run.status.code(), Some(1));
    assert!(
        stderr(&run).contains("never overwrites"),
        "{}",
        stderr(&run)
    );
}
