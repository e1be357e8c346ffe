//! What the CLI tests share: reading a run's stderr, comparing PNGs, reading the recipe an
//! output carries. Included with `#[path]` by icedit-cli's tests.
#![allow(dead_code)] // each test file uses some of these

use std::path::Path;
use std::process::{Command, Output};

/// `icedit COMMAND ARGS` offline, with `hf_home` as its Hugging Face home: a test never touches
/// the user's cache or the network.
pub fn icedit(command: &str, args: &[String], hf_home: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_icedit"))
        .arg(command)
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", hf_home)
        .env_remove("HF_HUB_CACHE")
        .output()
        .expect("run icedit")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A refused run: exit status 1 and every expected part in its message.
pub fn assert_refused(what: &str, run: &Output, expected: &[&str]) {
    let err = stderr(run);
    assert_eq!(run.status.code(), Some(1), "{what}: {err}");
    for part in expected {
        assert!(err.contains(part), "{what}: expected {part:?} in:\n{err}");
    }
}

/// Nothing a refused run might have written is left in `dir`: no file `is_output` names, and
/// no temporary file.
pub fn assert_nothing_written(what: &str, dir: &Path, is_output: impl Fn(&str) -> bool) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| is_output(n) || n.contains(".tmp"))
        .collect();
    assert!(left.is_empty(), "{what}: left {left:?}");
}

pub fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// The largest difference between two PNGs' pixels, in levels of 255.
pub fn max_png_diff(a: &Path, b: &Path) -> u8 {
    let a = image::open(a).unwrap().to_rgb8();
    let b = image::open(b).unwrap().to_rgb8();
    icedit_pipeline::image_io::max_pixel_diff(&a, &b).unwrap()
}

/// The recipe (`icedit` text chunk) of an output PNG.
pub fn recipe(path: &Path) -> serde_json::Value {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let reader = decoder.read_info().unwrap();
    let chunk = reader
        .info()
        .utf8_text
        .iter()
        .find(|c| c.keyword == "icedit")
        .expect("recipe chunk")
        .get_text()
        .unwrap();
    serde_json::from_str(&chunk).unwrap()
}
