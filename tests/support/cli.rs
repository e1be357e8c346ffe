//! What the CLI tests share: reading a run's stderr, comparing PNGs, reading the recipe an
//! output carries. Included with `#[path]` by icedit-cli's tests.
#![allow(dead_code)] // each test file uses some of these

use std::path::Path;
use std::process::Output;

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
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
