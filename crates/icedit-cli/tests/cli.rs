//! The `icedit` binary end to end: success output and exit codes of its error paths.

use std::path::PathBuf;
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    icedit_test_support::fixture("flux").join(name)
}

fn icedit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_icedit"))
        .args(args)
        .output()
        .expect("run icedit")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn inspect_reports_the_model_and_times_a_forward() {
    let model = fixture("fill_diptych");
    let out = icedit(&[
        "inspect",
        "--model",
        model.to_str().unwrap(),
        "--forward",
        "128x64",
        "--text-tokens",
        "7",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("2 double + 4 single blocks"), "{stdout}");
    assert!(stdout.contains("channels 384 -> 64"), "{stdout}");
    assert!(stdout.contains("output [1, 32, 64]"), "{stdout}");

    // The BFL file with its config, in bf16.
    let bfl = fixture("fill_diptych").join("flux1-bfl.safetensors");
    let config = fixture("fill_diptych").join("transformer/config.json");
    let out = icedit(&[
        "inspect",
        "--model",
        bfl.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--dtype",
        "bf16",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("Bfl layout"), "{stdout}");
}

#[test]
fn bad_input_exits_non_zero_with_a_reason() {
    let model = fixture("fill_diptych");
    let model = model.to_str().unwrap();
    let bfl = fixture("fill_diptych").join("flux1-bfl.safetensors");
    for (args, needle) in [
        (
            vec!["inspect", "--model", model, "--dtype", "int8"],
            "choose one of f32, bf16, f16",
        ),
        (
            vec!["inspect", "--model", "/nonexistent/model"],
            "/nonexistent/model",
        ),
        (
            vec!["inspect", "--model", bfl.to_str().unwrap()],
            "config.json",
        ),
        (
            vec!["inspect", "--model", model, "--forward", "big"],
            "WIDTHxHEIGHT",
        ),
        (
            vec!["inspect", "--model", model, "--forward", "8x8"],
            "at least 16",
        ),
    ] {
        let out = icedit(&args);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains(needle),
            "{args:?}: {stderr}"
        );
    }
}
