//! Masked ICEdit edits (crates/icedit-pipeline/src/masked.rs) on the tiny Fill pipeline: for
//! photos of several sizes and masks at edges and corners, every pixel outside the mask and its
//! feather is the source's byte for byte, the window's edit is exactly a plain `fill` of the
//! window's diptych with the user's mask on its right half (which the Fill parity ties to
//! diffusers), and the cost is the window's tokens, not the photo's.

use candle_core::{DType, Device};
use icedit_hub::{HubOptions, ModelRepo};
use icedit_pipeline::edit::diptych_prompt;
use icedit_pipeline::{
    ContextMargin, EditJob, EditSettings, EditText, FillRequest, FluxPipeline, InitialNoise,
    MaskedEdit, Window,
};
use image::{imageops, GrayImage, RgbImage};

fn pipeline() -> FluxPipeline {
    let repo = ModelRepo::open(
        icedit_test_support::fixture("fill_pipeline/tiny")
            .to_str()
            .unwrap(),
        &HubOptions::new(std::env::temp_dir()).with_offline(true),
    )
    .unwrap();
    FluxPipeline::new(repo, DType::F32, Device::Cpu).unwrap()
}

fn photo(width: u32, height: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([
            (x * 7 + y * 3) as u8,
            (x * 2 + y * 5 + 40) as u8,
            ((x ^ y) * 3) as u8,
        ])
    })
}

/// Pixels at chamfer distance over `feather` from the mask, i.e. surely outside the blend.
fn far_from(mask: &GrayImage, feather: u32, x: u32, y: u32) -> bool {
    let r = feather as i64 + 1;
    let (w, h) = (mask.width() as i64, mask.height() as i64);
    for dy in -r..=r {
        for dx in -r..=r {
            let (nx, ny) = (x as i64 + dx, y as i64 + dy);
            if nx >= 0
                && ny >= 0
                && nx < w
                && ny < h
                && mask.get_pixel(nx as u32, ny as u32).0[0] >= 128
            {
                return false;
            }
        }
    }
    true
}

#[test]
fn masked_edits_keep_every_pixel_outside_and_equal_a_fill_of_the_window() {
    let mut p = pipeline().keep_text_encoders(true);
    let prompt = diptych_prompt("make it night").unwrap();
    let encoded = p.encode_prompt(&prompt, 16, &mut |_| {}).unwrap();
    let settings = EditSettings {
        steps: 2,
        guidance: 50.0,
        max_sequence_length: 16,
    };
    // (photo size, region, working width, context, feather)
    let cases = [
        (
            (160, 120),
            Window {
                x: 40,
                y: 30,
                width: 30,
                height: 20,
            },
            64,
            ContextMargin::Pixels(8),
            4,
        ),
        (
            (4000, 3000),
            Window {
                x: 1800,
                y: 1400,
                width: 200,
                height: 120,
            },
            64,
            ContextMargin::Fraction(0.25),
            6,
        ),
        (
            (90, 300),
            Window {
                x: 0,
                y: 280,
                width: 20,
                height: 20,
            },
            64,
            ContextMargin::Pixels(16),
            0,
        ),
        (
            (300, 200),
            Window {
                x: 290,
                y: 0,
                width: 10,
                height: 10,
            },
            64,
            ContextMargin::Pixels(4),
            3,
        ),
    ];
    for ((pw, ph), region, width, context, feather) in cases {
        let what = format!("{pw}x{ph}, region {region:?}");
        let source = photo(pw, ph);
        let mask = region.mask(pw, ph).unwrap();
        let job = MaskedEdit::new(&source, &mask, width, context, feather).unwrap();
        let window = job.window;
        assert!(window.x <= region.x && window.y <= region.y, "{what}");
        assert!(window.x + window.width >= region.x + region.width, "{what}");
        assert!(
            window.y + window.height >= region.y + region.height,
            "{what}"
        );
        let job = EditJob::Masked(job);
        let text = EditText::new(&prompt, &encoded);
        let out = p
            .edit(&job, &text, &settings, InitialNoise::Seed(3), &mut |_| {})
            .unwrap();
        assert_eq!(
            out.edited.dimensions(),
            (pw, ph),
            "{what}: the photo's own size"
        );

        // Outside the mask and its feather: the source, byte for byte.
        let mut changed_inside = 0;
        for (x, y, px) in out.edited.enumerate_pixels() {
            if mask.get_pixel(x, y).0[0] >= 128 {
                changed_inside += (px != source.get_pixel(x, y)) as usize;
            } else if far_from(&mask, feather, x, y) {
                assert_eq!(px, source.get_pixel(x, y), "{what}: ({x}, {y}) changed");
            }
        }
        assert!(changed_inside > 0, "{what}: the edit changed nothing");

        // Inside: a plain fill of the window's diptych with that mask, stitched the same way.
        let EditJob::Masked(masked) = &job else {
            unreachable!()
        };
        let d = &masked.diptych;
        let fill = p
            .fill(
                &FillRequest {
                    image: &d.canvas,
                    mask: &d.mask,
                    prompt: &prompt,
                    steps: settings.steps,
                    guidance: settings.guidance,
                    noise: InitialNoise::Seed(3),
                    max_sequence_length: 16,
                },
                &mut |_| {},
            )
            .unwrap();
        assert_eq!(
            out.generated, fill.image,
            "{what}: the window's diptych as a plain fill"
        );
        assert_eq!(
            masked.stitch(&d.right_half(&fill.image)),
            out.edited,
            "{what}"
        );
        // The left half is never regenerated; the right half's mask is the user's.
        let hw = d.half_width;
        assert!(d
            .mask
            .enumerate_pixels()
            .all(|(x, _, m)| x >= hw || m.0[0] == 0));
        if (window.width, window.height) == (hw, d.height) {
            let crop = imageops::crop_imm(&mask, window.x, window.y, window.width, window.height)
                .to_image();
            let right = imageops::crop_imm(&d.mask, hw, 0, hw, d.height).to_image();
            assert_eq!(
                right, crop,
                "{what}: at scale 1 the right half's mask is the user's"
            );
        }
    }
}

#[test]
fn bad_masks_are_refused() {
    let source = photo(100, 80);
    let empty = GrayImage::new(100, 80);
    let err = MaskedEdit::new(&source, &empty, 64, ContextMargin::Pixels(8), 4)
        .unwrap_err()
        .to_string();
    assert!(err.contains("selects nothing"), "{err}");
    let other = GrayImage::from_pixel(50, 80, image::Luma([255]));
    let err = MaskedEdit::new(&source, &other, 64, ContextMargin::Pixels(8), 4)
        .unwrap_err()
        .to_string();
    assert!(err.contains("photo's size"), "{err}");
    // One pixel of a 4000-pixel-wide window scaled to 64 vanishes.
    let big = photo(4000, 100);
    let mut dot = GrayImage::new(4000, 100);
    dot.put_pixel(10, 50, image::Luma([255]));
    let err = MaskedEdit::new(&big, &dot, 64, ContextMargin::Pixels(3000), 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("vanish"), "{err}");
}
