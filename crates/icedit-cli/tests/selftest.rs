//! `icedit selftest`: the release binary proves itself against the committed fixtures (what a
//! GPU machine without a Rust toolchain runs), and fails loudly when a fixture is altered.

use std::path::Path;
use std::process::Command;

#[path = "../../../tests/support/cli.rs"]
mod cli_support;
use cli_support::*;
use icedit_test_support::fixtures;

fn selftest(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_icedit"))
        .arg("selftest")
        .args(args)
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap()
}

fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap().path();
            copy_tree(&entry, &to.join(entry.file_name().unwrap()));
        }
    } else {
        std::fs::copy(from, to).unwrap();
    }
}

#[test]
fn selftest_passes_on_the_cpu_and_fails_on_an_altered_fixture() {
    let fixtures = fixtures();
    let run = selftest(&["--device", "cpu", "--fixtures", fixtures.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&run.stdout).to_string();
    assert!(run.status.success(), "{out}\n{}", stderr(&run));
    assert!(out.contains("27 checks, 27 passed, 0 failed"), "{out}");

    // A copy with diffusers' PNG of one run changed by 3 levels in one pixel.
    let copy = tempfile::tempdir().unwrap();
    for part in ["flux", "gguf", "fill_pipeline/tiny"] {
        copy_tree(&fixtures.join(part), &copy.path().join(part));
    }
    let png = copy.path().join("gguf/runs/q8_0_bare/edit.png");
    let mut image = image::open(&png).unwrap().to_rgb8();
    let pixel = image.get_pixel_mut(5, 5);
    pixel[0] = if pixel[0] > 128 {
        pixel[0] - 3
    } else {
        pixel[0] + 3
    };
    image.save(&png).unwrap();
    let run = selftest(&[
        "--device",
        "cpu",
        "--fixtures",
        copy.path().to_str().unwrap(),
        "--only",
        "edit q8_0",
    ]);
    let out = String::from_utf8_lossy(&run.stdout).to_string();
    assert_eq!(run.status.code(), Some(1), "{out}");
    assert!(
        out.contains("FAIL edit q8_0_bare") && out.contains("1 failed"),
        "{out}"
    );
    assert!(
        stderr(&run).contains("1 selftest check(s) failed"),
        "{}",
        stderr(&run)
    );

    // No fixtures there, and a filter that matches nothing: refused, saying why.
    let empty = tempfile::tempdir().unwrap();
    assert_refused(
        "no fixtures",
        &selftest(&["--fixtures", empty.path().to_str().unwrap()]),
        &["not icedit's test fixtures"],
    );
    assert_refused(
        "no such check",
        &selftest(&[
            "--fixtures",
            fixtures.to_str().unwrap(),
            "--only",
            "nothing",
        ]),
        &["matches no check"],
    );
}
