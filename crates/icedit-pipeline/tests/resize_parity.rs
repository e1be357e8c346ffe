//! The resampler against PIL's `Image.resize` (tests/reference/gen_resize.py): bicubic and
//! Lanczos, shrinking and enlarging, one axis or both, RGB and grayscale, pixel for pixel.

use std::path::PathBuf;

use icedit_image::resize::{resize_gray, resize_rgb, Filter};
use icedit_pipeline::image_io::max_pixel_diff;
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    icedit_test_support::fixture("resize").join(name)
}

#[test]
fn resizes_equal_pil_exactly() {
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("cases.json")).unwrap()).unwrap();
    let rgb = image::open(fixture("source.png")).unwrap().to_rgb8();
    let gray = image::open(fixture("source_gray.png")).unwrap().to_luma8();
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let (w, h) = (
            case["width"].as_u64().unwrap() as u32,
            case["height"].as_u64().unwrap() as u32,
        );
        let filter = match case["filter"].as_str().unwrap() {
            "bicubic" => Filter::Bicubic,
            _ => Filter::Lanczos,
        };
        let expected = image::open(fixture(&format!("{name}.png"))).unwrap();
        if case["mode"] == "L" {
            let ours = resize_gray(&gray, w, h, filter);
            assert_eq!(ours, expected.to_luma8(), "{name}");
        } else {
            let ours = resize_rgb(&rgb, w, h, filter);
            let diff = max_pixel_diff(&ours, &expected.to_rgb8()).unwrap();
            assert_eq!(diff, 0, "{name}: differs from PIL by {diff} levels");
        }
    }
}
