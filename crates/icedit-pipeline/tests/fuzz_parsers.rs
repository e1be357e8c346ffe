//! Fuzzing (proptest, bounded case counts) of what the pipeline reads from a user: the size
//! arguments (`--expand` margins, `--width`, image size checks), the scheduler config, the
//! text encoders' configs, and image and mask files.
//!
//! Every input must give `Ok` or a clear `Err`: no panic, no hang, no allocation sized by a
//! header rather than by the file. Valid inputs must round-trip where that means something.

#[path = "../../../tests/support/fuzz.rs"]
mod fuzz;

use std::io::Cursor;
use std::path::Path;

use fuzz::*;
use icedit_pipeline::canvas::Margins;
use icedit_pipeline::edit::half_size;
use icedit_pipeline::image_io::{check_size, load_mask, load_rgb, MAX_PIXELS};
use icedit_pipeline::scheduler::{FlowMatchSchedule, SchedulerConfig};
use icedit_text::{ClipTextConfig, ClipVisionConfig, T5Config};
use image::{DynamicImage, ImageFormat};
use proptest::prelude::*;
use serde_json::Value;

const MAX_ALLOC: usize = 16 << 20;

// ---------------------------------------------------------------------------------------------
// Size arguments

/// u32s, often at the edges.
fn edge_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        2 => proptest::sample::select(vec![
            0u32, 1, 15, 16, 17, 32, 512, 1024, 2048, 2049, 4096, 65535, 65536,
            1 << 31, (1 << 31) + 16, u32::MAX - 15, u32::MAX - 1, u32::MAX,
        ]),
        1 => (0u32..(1 << 28)).prop_map(|v| v * 16),
        1 => 0u32..5000,
        1 => any::<u32>(),
    ]
}

fn margins_text() -> impl Strategy<Value = String> {
    let number = prop_oneof![
        edge_u32().prop_map(|v| v.to_string()),
        proptest::sample::select(vec![
            "",
            " ",
            "-1",
            "+1",
            "4294967296",
            "99999999999999999999",
            "1.5",
            "1e3",
            "0x10",
            " 7 ",
            "٣",
            "NaN",
        ])
        .prop_map(str::to_string),
    ];
    prop_oneof![
        3 => proptest::collection::vec(number, 0..6).prop_map(|parts| parts.join(",")),
        1 => ".{0,30}",
    ]
}

proptest! {
    #![proptest_config(config(2048))]

    /// `--expand`: any text; what parses gives a canvas within the pixel limit (or a clear
    /// error) for any image size.
    #[test]
    fn expand_margins(text in margins_text(), w in edge_u32(), h in edge_u32()) {
        let parsed = bounded("margins", MAX_ALLOC, || Margins::parse(&text));
        if let Ok(m) = parsed {
            let sides = [m.left, m.top, m.right, m.bottom];
            prop_assert!(text.split(',').count() == 1 || text.split(',').count() == 4);
            if let Ok((cw, ch)) = m.canvas_size(w, h) {
                prop_assert_eq!(cw as u64, w as u64 + m.left as u64 + m.right as u64);
                prop_assert_eq!(ch as u64, h as u64 + m.top as u64 + m.bottom as u64);
                prop_assert!(cw as u64 * ch as u64 <= MAX_PIXELS);
                prop_assert!(cw >= 16 && ch >= 16);
                prop_assert!(sides.iter().all(|s| *s <= cw.max(ch)));
            }
        }
    }

    /// Margins written out parse back to themselves.
    #[test]
    fn expand_margins_round_trip(sides in proptest::array::uniform4(edge_u32()), spaces in any::<bool>()) {
        let sep = if spaces { " , " } else { "," };
        let text = sides.iter().map(u32::to_string).collect::<Vec<_>>().join(sep);
        let m = Margins::parse(&text).unwrap();
        prop_assert_eq!([m.left, m.top, m.right, m.bottom], sides);
        let one = Margins::parse(&sides[0].to_string()).unwrap();
        prop_assert_eq!([one.left, one.top, one.right, one.bottom], [sides[0]; 4]);
    }

    /// `--width` and the source size: never a panic; an Ok half size is on the 16-pixel grid
    /// and the diptych within the pixel limit.
    #[test]
    fn diptych_half_size(sw in edge_u32(), sh in edge_u32(), width in edge_u32()) {
        if let Ok((w, h)) = bounded("half size", MAX_ALLOC, || half_size(sw, sh, width)) {
            prop_assert_eq!(w, width);
            prop_assert!(w % 16 == 0 && h % 16 == 0 && w >= 16 && h >= 16);
            prop_assert!(2 * w as u64 * h as u64 <= MAX_PIXELS);
        }
    }

    /// The size check is exactly its documented rule.
    #[test]
    fn size_check(w in edge_u32(), h in edge_u32(), what in ".{0,10}") {
        let ok = check_size(w, h, &what).is_ok();
        prop_assert_eq!(ok, w >= 16 && h >= 16 && w as u64 * h as u64 <= MAX_PIXELS);
    }
}

// ---------------------------------------------------------------------------------------------
// Configs

fn mutated_json(
    seed: &str,
    edits: &[JsonEdit],
    raw: Option<Vec<u8>>,
    bytes: &[ByteEdit],
) -> Vec<u8> {
    let mut value: Value =
        serde_json::from_slice(&std::fs::read(icedit_test_support::fixture(seed)).unwrap())
            .unwrap();
    apply_json_edits(&mut value, edits);
    let mut out = raw.unwrap_or_else(|| json_text(&value).into_bytes());
    apply_byte_edits(&mut out, bytes, usize::MAX);
    out
}

fn write_temp(bytes: &[u8], name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

proptest! {
    #![proptest_config(config(768))]

    /// scheduler/scheduler_config.json, mutated; an Ok config gives finite schedules in [0, 1]
    /// for any step count and image size.
    #[test]
    fn scheduler_config_mutated(
        edits in json_edits(4),
        raw in proptest::option::weighted(0.05, proptest::collection::vec(any::<u8>(), 0..128)),
        byte_edits in sometimes(byte_edit(), 2),
        steps in prop_oneof![1usize..60, Just(1000)],
        // Up to the pixel limit (2048 x 2048 is 16384 tokens), and beyond.
        seq_len in prop_oneof![4 => 1usize..=16384, 1 => Just(0), 1 => Just(1 << 20)],
    ) {
        let bytes = mutated_json("fill_pipeline/tiny/scheduler/scheduler_config.json", &edits, raw, &byte_edits);
        let (_dir, path) = write_temp(&bytes, "scheduler_config.json");
        bounded("scheduler config", MAX_ALLOC, || {
            if let Ok(config) = SchedulerConfig::from_json_file(&path) {
                if let Ok(schedule) = FlowMatchSchedule::new(&config, steps, seq_len) {
                    prop_assert_eq!(schedule.steps(), steps);
                    prop_assert!(
                        schedule.sigmas.iter().all(|s| s.is_finite() && (0.0..=1.0).contains(s)),
                        "{config:?} {steps} {seq_len}: {:?}", schedule.sigmas
                    );
                    prop_assert!(schedule.timesteps.iter().all(|t| t.is_finite()));
                }
            }
            Ok(())
        })?;
    }

    /// The T5 encoder's config.json; what parses is within the documented bounds.
    #[test]
    fn t5_config_mutated(
        edits in json_edits(4),
        raw in proptest::option::weighted(0.05, proptest::collection::vec(any::<u8>(), 0..128)),
        byte_edits in sometimes(byte_edit(), 2),
    ) {
        use icedit_flux::files::{MAX_CONFIG_LAYERS, MAX_CONFIG_VOCAB, MAX_CONFIG_WIDTH};
        let bytes = mutated_json("fill_pipeline/tiny/text_encoder_2/config.json", &edits, raw, &byte_edits);
        let (_dir, path) = write_temp(&bytes, "config.json");
        if let Ok(c) = bounded("t5 config", MAX_ALLOC, || T5Config::from_file(&path)) {
            prop_assert!((1..=MAX_CONFIG_VOCAB).contains(&c.vocab_size));
            prop_assert!((1..=MAX_CONFIG_WIDTH).contains(&c.d_model));
            prop_assert!((1..=MAX_CONFIG_WIDTH).contains(&c.d_ff));
            prop_assert!((1..=MAX_CONFIG_LAYERS).contains(&c.num_layers));
            prop_assert!(c.num_heads > 0 && c.d_kv > 0 && c.num_heads * c.d_kv <= MAX_CONFIG_WIDTH);
            prop_assert!((4..=1 << 12).contains(&c.relative_attention_num_buckets));
            prop_assert!(c.feed_forward().is_ok());
        }
    }

    /// The CLIP text encoder's config.json (a CLIPTextModel one, or a CLIPModel one with its
    /// text and vision sections).
    #[test]
    fn clip_configs_mutated(
        full in any::<bool>(),
        edits in json_edits(4),
        raw in proptest::option::weighted(0.05, proptest::collection::vec(any::<u8>(), 0..128)),
        byte_edits in sometimes(byte_edit(), 2),
    ) {
        use icedit_flux::files::{MAX_CONFIG_LAYERS, MAX_CONFIG_VOCAB, MAX_CONFIG_WIDTH};
        let seed = if full { "clip/model/config.json" } else { "fill_pipeline/tiny/text_encoder/config.json" };
        let bytes = mutated_json(seed, &edits, raw, &byte_edits);
        let (_dir, path) = write_temp(&bytes, "config.json");
        if let Ok(c) = bounded("clip text config", MAX_ALLOC, || ClipTextConfig::from_file(&path)) {
            prop_assert!((1..=MAX_CONFIG_VOCAB).contains(&c.vocab_size));
            prop_assert!((1..=MAX_CONFIG_WIDTH).contains(&c.hidden_size));
            prop_assert!((1..=MAX_CONFIG_WIDTH).contains(&c.intermediate_size));
            prop_assert!((1..=MAX_CONFIG_LAYERS).contains(&c.num_hidden_layers));
            prop_assert!((1..=1 << 16).contains(&c.max_position_embeddings));
            prop_assert!(c.num_attention_heads > 0 && c.hidden_size % c.num_attention_heads == 0);
        }
        if let Ok(c) = bounded("clip vision config", MAX_ALLOC, || ClipVisionConfig::from_file(&path)) {
            prop_assert!((1..=MAX_CONFIG_WIDTH).contains(&c.hidden_size));
            prop_assert!((1..=MAX_CONFIG_LAYERS).contains(&c.num_hidden_layers));
            prop_assert!(c.num_attention_heads > 0 && c.hidden_size % c.num_attention_heads == 0);
            prop_assert!(c.patch_size > 0 && c.image_size % c.patch_size == 0);
        }
    }
}

#[test]
fn config_seeds_are_valid() {
    let path = icedit_test_support::fixture("fill_pipeline/tiny/scheduler/scheduler_config.json");
    let config = SchedulerConfig::from_json_file(&path).unwrap();
    assert!(FlowMatchSchedule::new(&config, 28, 4096).is_ok());
    T5Config::from_file(&icedit_test_support::fixture(
        "fill_pipeline/tiny/text_encoder_2/config.json",
    ))
    .unwrap();
    ClipTextConfig::from_file(&icedit_test_support::fixture(
        "fill_pipeline/tiny/text_encoder/config.json",
    ))
    .unwrap();
    ClipTextConfig::from_file(&icedit_test_support::fixture("clip/model/config.json")).unwrap();
    ClipVisionConfig::from_file(&icedit_test_support::fixture("clip/model/config.json")).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Images

/// Decoding may allocate up to the image crate's default limit (512 MiB) for what a header
/// claims, and once more converting it to RGB; anything beyond is a missing bound.
const MAX_IMAGE_ALLOC: usize = 600 << 20;

const FORMATS: [ImageFormat; 5] = [
    ImageFormat::Png,
    ImageFormat::Jpeg,
    ImageFormat::WebP,
    ImageFormat::Bmp,
    ImageFormat::Tiff,
];

/// A small image of some color type, as raw pixels.
fn small_image() -> impl Strategy<Value = DynamicImage> {
    (1u32..24, 1u32..24, 0usize..5, any::<u64>()).prop_map(|(w, h, kind, seed)| {
        let px = |x: u32, y: u32, c: u64| {
            (seed.wrapping_mul(x as u64 * 31 + y as u64 * 17 + c * 7 + 1) >> 24) as u8
        };
        match kind {
            0 => DynamicImage::ImageRgb8(image::RgbImage::from_fn(w, h, |x, y| {
                image::Rgb([px(x, y, 0), px(x, y, 1), px(x, y, 2)])
            })),
            1 => DynamicImage::ImageRgba8(image::RgbaImage::from_fn(w, h, |x, y| {
                image::Rgba([px(x, y, 0), px(x, y, 1), px(x, y, 2), px(x, y, 3)])
            })),
            2 => DynamicImage::ImageLuma8(image::GrayImage::from_fn(w, h, |x, y| {
                image::Luma([px(x, y, 0)])
            })),
            3 => DynamicImage::ImageLumaA8(image::GrayAlphaImage::from_fn(w, h, |x, y| {
                image::LumaA([px(x, y, 0), px(x, y, 1)])
            })),
            _ => DynamicImage::ImageRgb16(image::ImageBuffer::from_fn(w, h, |x, y| {
                image::Rgb([px(x, y, 0) as u16 * 257, px(x, y, 1) as u16 * 3, 65535])
            })),
        }
    })
}

/// The image in `format`, if that format can hold its color type.
fn encode(image: &DynamicImage, format: ImageFormat) -> Option<Vec<u8>> {
    let image = match format {
        // JPEG holds no alpha and 8 bits only; WebP 8-bit RGB(A) only.
        ImageFormat::Jpeg => DynamicImage::ImageRgb8(image.to_rgb8()),
        ImageFormat::WebP => DynamicImage::ImageRgba8(image.to_rgba8()),
        _ => image.clone(),
    };
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, format).ok()?;
    Some(out.into_inner())
}

/// Loads `path` as an image and as a mask: Ok results are non-empty and within the decode
/// limits, and agree in size.
fn load_both(path: &Path) -> (Option<image::RgbImage>, Option<image::GrayImage>) {
    let rgb = bounded("load_rgb", MAX_IMAGE_ALLOC, || load_rgb(path))
        .ok()
        .map(|l| l.rgb);
    let mask = bounded("load_mask", MAX_IMAGE_ALLOC, || load_mask(path)).ok();
    for (w, h) in rgb
        .iter()
        .map(|i| i.dimensions())
        .chain(mask.iter().map(|m| m.dimensions()))
    {
        assert!(w > 0 && h > 0, "{}: decoded to {w}x{h}", path.display());
        assert!(
            w <= 16384 && h <= 16384,
            "{}: decoded to {w}x{h}",
            path.display()
        );
    }
    if let (Some(r), Some(m)) = (&rgb, &mask) {
        assert_eq!(r.dimensions(), m.dimensions());
    }
    (rgb, mask)
}

proptest! {
    #![proptest_config(config(512))]

    /// Arbitrary bytes, alone or behind a real format's signature.
    #[test]
    fn image_random_bytes(
        magic in proptest::sample::select(vec![
            &b""[..], b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF\0\0\0\0WEBPVP8 ", b"BM",
            b"II*\0", b"MM\0*", b"GIF89a",
        ]),
        bytes in proptest::collection::vec(any::<u8>(), 0..400),
    ) {
        let (_dir, path) = write_temp(&[magic, &bytes[..]].concat(), "image");
        load_both(&path);
    }

    /// Valid small images in every format, then cut, with bytes changed, inserted or deleted
    /// (mostly in the first 64 bytes, where the headers are).
    #[test]
    fn image_mutated(
        image in small_image(),
        format in proptest::sample::select(FORMATS.to_vec()),
        edits in proptest::collection::vec(byte_edit(), 1..4),
        focus in prop_oneof![Just(64usize), Just(usize::MAX)],
    ) {
        let Some(mut bytes) = encode(&image, format) else { return Ok(()) };
        apply_byte_edits(&mut bytes, &edits, focus);
        let (_dir, path) = write_temp(&bytes, "image");
        load_both(&path);
    }

    /// Valid images load at their size; the lossless formats give back their pixels.
    #[test]
    fn image_round_trip(image in small_image(), format in proptest::sample::select(FORMATS.to_vec())) {
        let Some(bytes) = encode(&image, format) else { return Ok(()) };
        let (_dir, path) = write_temp(&bytes, "image");
        let (rgb, mask) = load_both(&path);
        let (rgb, mask) = (rgb.expect("a valid image loads"), mask.expect("a valid mask loads"));
        prop_assert_eq!(rgb.dimensions(), (image.width(), image.height()));
        let lossless_8bit = format != ImageFormat::Jpeg
            && matches!(image, DynamicImage::ImageRgb8(_) | DynamicImage::ImageLuma8(_));
        if lossless_8bit && format != ImageFormat::WebP {
            prop_assert_eq!(&rgb, &image.to_rgb8());
        }
        if lossless_8bit && matches!(image, DynamicImage::ImageLuma8(_)) && format != ImageFormat::WebP {
            prop_assert_eq!(&mask, &image.to_luma8());
        }
    }
}
