//! Masked ICEdit edits whose cost follows the mask (LazyDiffusion's idea): only a context window
//! around the mask is edited, as the diptych of that crop at the working width with the user's
//! mask (not the whole right half) regenerated, and the result is stitched back into the photo
//! at its own resolution, inside the mask and its feathered edge only. Every other pixel stays
//! the source's, bit for bit.

use icedit_image::resize::{resize_gray, resize_rgb, Filter};
use image::{imageops, GrayImage, Luma, RgbImage};

use crate::edit::Diptych;
use crate::error::{PipelineError, Result};
use crate::image_io::binarize;
use crate::latents::PIXELS_PER_TOKEN;

const GRID: u32 = PIXELS_PER_TOKEN as u32;

/// The smallest window side (pixels, unless the photo is smaller): a few tokens of context
/// even around a tiny mask.
pub const MIN_WINDOW: u32 = 64;

/// How far the window reaches beyond the mask's bounding box, on each side.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContextMargin {
    Pixels(u32),
    /// A fraction of the bounding box's longer side.
    Fraction(f64),
}

impl ContextMargin {
    /// `64` (pixels), `0.25` or `25%` (of the mask's longer side).
    pub fn parse(text: &str) -> Result<Self> {
        let bad = || {
            PipelineError::Input(format!(
                "--context {text:?}: give pixels (e.g. 64) or a fraction of the mask's size \
                 (e.g. 0.25 or 25%)"
            ))
        };
        let text = text.trim();
        if let Some(percent) = text.strip_suffix('%') {
            let value: f64 = percent.trim().parse().map_err(|_| bad())?;
            return Self::fraction(value / 100.0).ok_or_else(bad);
        }
        if let Ok(pixels) = text.parse::<u32>() {
            return Ok(Self::Pixels(pixels));
        }
        let value: f64 = text.parse().map_err(|_| bad())?;
        if value < 1.0 {
            Self::fraction(value).ok_or_else(bad)
        } else {
            Err(bad())
        }
    }

    fn fraction(value: f64) -> Option<Self> {
        (value.is_finite() && (0.0..=10.0).contains(&value)).then_some(Self::Fraction(value))
    }

    fn pixels(self, bounds: &Window) -> u32 {
        match self {
            Self::Pixels(p) => p,
            Self::Fraction(f) => (f * bounds.width.max(bounds.height) as f64).ceil() as u32,
        }
    }
}

/// A rectangle of the photo, in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

impl Window {
    /// Parses `--region x,y,w,h`.
    pub fn parse(text: &str) -> Result<Self> {
        let parts: Vec<u32> = text
            .split(',')
            .map(|p| p.trim().parse::<u32>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| {
                PipelineError::Input(format!("--region {text:?}: give x,y,w,h in pixels"))
            })?;
        match parts[..] {
            [x, y, width, height] if width > 0 && height > 0 => Ok(Self {
                x,
                y,
                width,
                height,
            }),
            _ => Err(PipelineError::Input(format!(
                "--region {text:?}: give x,y,w,h in pixels, with w and h above 0"
            ))),
        }
    }

    /// A white mask of this region on a `width` x `height` photo; the region must lie inside.
    pub fn mask(&self, width: u32, height: u32) -> Result<GrayImage> {
        let inside = self.x.checked_add(self.width).is_some_and(|r| r <= width)
            && self.y.checked_add(self.height).is_some_and(|b| b <= height);
        if !inside {
            return Err(PipelineError::Input(format!(
                "--region {},{},{},{} reaches outside the {width}x{height} photo",
                self.x, self.y, self.width, self.height
            )));
        }
        Ok(GrayImage::from_fn(width, height, |x, y| {
            let on =
                x >= self.x && x < self.x + self.width && y >= self.y && y < self.y + self.height;
            Luma([if on { 255 } else { 0 }])
        }))
    }

    fn right(&self) -> u32 {
        self.x + self.width
    }

    fn bottom(&self) -> u32 {
        self.y + self.height
    }
}

/// The bounding box of the mask's selected pixels (>= 128), if any.
pub fn mask_bounds(mask: &GrayImage) -> Option<Window> {
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
    for (x, y, p) in mask.enumerate_pixels() {
        if p.0[0] >= 128 {
            x0 = x0.min(x);
            y0 = y0.min(y);
            x1 = x1.max(x + 1);
            y1 = y1.max(y + 1);
        }
    }
    (x0 != u32::MAX).then(|| Window {
        x: x0,
        y: y0,
        width: x1 - x0,
        height: y1 - y0,
    })
}

/// The window edited for a mask: its bounding box grown by `context` on each side, each edge
/// moved outward to the photo's 16-pixel grid, each side at least [`MIN_WINDOW`] (grown evenly,
/// shifted inside the photo), and clamped to the photo.
pub fn context_window(bounds: Window, context: ContextMargin, photo: (u32, u32)) -> Window {
    let (pw, ph) = photo;
    let c = context.pixels(&bounds);
    let axis = |start: u32, end: u32, size: u32| -> (u32, u32) {
        let lo = start.saturating_sub(c) / GRID * GRID;
        let hi = end
            .saturating_add(c)
            .div_ceil(GRID)
            .saturating_mul(GRID)
            .min(size);
        let min = MIN_WINDOW.min(size);
        if hi - lo >= min {
            return (lo, hi);
        }
        // Grow evenly to the minimum, then shift back inside the photo.
        let missing = min - (hi - lo);
        let lo = lo.saturating_sub(missing / 2);
        let hi = (lo + min).min(size);
        (hi - min, hi)
    };
    let (x0, x1) = axis(bounds.x, bounds.right(), pw);
    let (y0, y1) = axis(bounds.y, bounds.bottom(), ph);
    Window {
        x: x0,
        y: y0,
        width: x1 - x0,
        height: y1 - y0,
    }
}

/// A masked edit: the window, the diptych of its crop with the user's mask on the right half,
/// and the blend that puts the result back.
#[derive(Debug, Clone)]
pub struct MaskedEdit {
    pub window: Window,
    /// The crop's diptych at the working width; its mask is the user's (cropped, resized to the
    /// half size, binarised) on the right half, black on the left.
    pub diptych: Diptych,
    /// The photo the result is stitched into.
    photo: RgbImage,
    /// Blend weights over the window: 1 inside the mask, falling to 0 across the feather.
    alpha: Vec<f32>,
}

impl MaskedEdit {
    /// Prepares the edit of `photo` inside `mask` (the photo's size, white = edit) at the
    /// working `width` (the diptych's half width), with `context` around the mask and a
    /// `feather`-pixel soft edge.
    pub fn new(
        photo: &RgbImage,
        mask: &GrayImage,
        width: u32,
        context: ContextMargin,
        feather: u32,
    ) -> Result<Self> {
        if mask.dimensions() != photo.dimensions() {
            let (mw, mh) = mask.dimensions();
            return Err(PipelineError::Input(format!(
                "the mask is {mw}x{mh} but the photo is {}x{}; give a mask of the photo's size \
                 (white = edit)",
                photo.width(),
                photo.height()
            )));
        }
        let bounds = mask_bounds(mask).ok_or_else(|| {
            PipelineError::Input(
                "the mask selects nothing (no pixel at or above 128); paint the region to edit \
                 white"
                    .into(),
            )
        })?;
        let window = context_window(bounds, context, photo.dimensions());
        let crop = |image: &RgbImage| {
            imageops::crop_imm(image, window.x, window.y, window.width, window.height).to_image()
        };
        let mut diptych = Diptych::new(&crop(photo), width)?;
        let crop_mask =
            imageops::crop_imm(mask, window.x, window.y, window.width, window.height).to_image();
        let (hw, hh) = (diptych.half_width, diptych.height);
        let half_mask = if crop_mask.dimensions() == (hw, hh) {
            crop_mask.clone()
        } else {
            resize_gray(&crop_mask, hw, hh, Filter::Lanczos)
        };
        if binarize(&half_mask).iter().all(|&m| m == 0.0) {
            return Err(PipelineError::Input(format!(
                "the mask's {}x{} pixels vanish when its window is scaled to the working width \
                 {width}; paint a larger mask or use a smaller --width",
                bounds.width, bounds.height
            )));
        }
        diptych.mask = GrayImage::from_fn(2 * hw, hh, |x, y| {
            let on = x >= hw && half_mask.get_pixel(x - hw, y).0[0] >= 128;
            Luma([if on { 255 } else { 0 }])
        });
        let alpha = feathered(&crop_mask, feather);
        Ok(Self {
            window,
            diptych,
            photo: photo.clone(),
            alpha,
        })
    }

    /// The photo with the edit's right half (the crop's edit at the working size) resized back
    /// to the window and blended in: the edit inside the mask, the source beyond the feather.
    pub fn stitch(&self, edited_half: &RgbImage) -> RgbImage {
        let Window {
            x,
            y,
            width,
            height,
        } = self.window;
        let edit = if edited_half.dimensions() == (width, height) {
            edited_half.clone()
        } else {
            resize_rgb(edited_half, width, height, Filter::Bicubic)
        };
        let mut out = self.photo.clone();
        for wy in 0..height {
            for wx in 0..width {
                let a = self.alpha[(wy * width + wx) as usize];
                if a == 0.0 {
                    continue;
                }
                let src = out.get_pixel_mut(x + wx, y + wy);
                let new = edit.get_pixel(wx, wy);
                for c in 0..3 {
                    let v = a * new.0[c] as f32 + (1.0 - a) * src.0[c] as f32;
                    src.0[c] = v.round().clamp(0.0, 255.0) as u8;
                }
            }
        }
        out
    }
}

/// Blend weights: 1 on the mask (>= 128), `1 - d / (feather + 1)` at chamfer distance `d`
/// pixels outside it up to `feather`, 0 beyond (so no pixel past the feather changes).
fn feathered(mask: &GrayImage, feather: u32) -> Vec<f32> {
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    let inside: Vec<bool> = mask.pixels().map(|p| p.0[0] >= 128).collect();
    if feather == 0 {
        return inside.iter().map(|&i| i as u8 as f32).collect();
    }
    // Two-pass 3-4 chamfer distance (in thirds of a pixel) to the nearest mask pixel.
    let far = u32::MAX / 2;
    let mut d: Vec<u32> = inside.iter().map(|&i| if i { 0 } else { far }).collect();
    let at = |x: usize, y: usize| y * w + x;
    for y in 0..h {
        for x in 0..w {
            let mut best = d[at(x, y)];
            if x > 0 {
                best = best.min(d[at(x - 1, y)] + 3);
            }
            if y > 0 {
                best = best.min(d[at(x, y - 1)] + 3);
                if x > 0 {
                    best = best.min(d[at(x - 1, y - 1)] + 4);
                }
                if x + 1 < w {
                    best = best.min(d[at(x + 1, y - 1)] + 4);
                }
            }
            d[at(x, y)] = best;
        }
    }
    for y in (0..h).rev() {
        for x in (0..w).rev() {
            let mut best = d[at(x, y)];
            if x + 1 < w {
                best = best.min(d[at(x + 1, y)] + 3);
            }
            if y + 1 < h {
                best = best.min(d[at(x, y + 1)] + 3);
                if x + 1 < w {
                    best = best.min(d[at(x + 1, y + 1)] + 4);
                }
                if x > 0 {
                    best = best.min(d[at(x - 1, y + 1)] + 4);
                }
            }
            d[at(x, y)] = best;
        }
    }
    d.iter()
        .map(|&thirds| {
            let pixels = thirds as f32 / 3.0;
            if pixels > feather as f32 {
                0.0
            } else {
                1.0 - pixels / (feather as f32 + 1.0)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(x: u32, y: u32, width: u32, height: u32) -> Window {
        Window {
            x,
            y,
            width,
            height,
        }
    }

    #[test]
    fn windows_snap_outward_to_the_grid_and_stay_inside() {
        let photo = (4000, 3000);
        // Grown by 20 px, snapped outward: x 980 -> 976, 1120 -> 1120; y 480, 580 -> 592.
        let w = context_window(window(1000, 500, 100, 60), ContextMargin::Pixels(20), photo);
        assert_eq!(w, window(976, 480, 144, 112));
        for v in [w.x, w.y, w.width, w.height] {
            assert_eq!(v % 16, 0);
        }
        // A fraction of the longer side: 0.5 x 100 = 50 px.
        let w = context_window(
            window(1000, 500, 100, 60),
            ContextMargin::Fraction(0.5),
            photo,
        );
        assert_eq!(w, window(944, 448, 208, 176));
        // At a corner: clamped to the photo.
        let w = context_window(window(0, 0, 10, 10), ContextMargin::Pixels(8), photo);
        assert_eq!(w, window(0, 0, 64, 64));
        let w = context_window(window(3990, 2990, 10, 10), ContextMargin::Pixels(8), photo);
        assert_eq!(w, window(3936, 2936, 64, 64));
        // A photo off the grid: the last edge is the photo's.
        let w = context_window(window(90, 10, 5, 30), ContextMargin::Pixels(4), (100, 50));
        assert_eq!((w.right(), w.bottom()), (100, 50));
        assert_eq!((w.width, w.height), (64, 50));
        // A tiny mask still gets a 64-pixel window.
        let w = context_window(window(500, 500, 1, 1), ContextMargin::Pixels(0), photo);
        assert_eq!((w.width, w.height), (64, 64));
        assert!(w.x <= 500 && w.right() > 500);
        // A photo smaller than the minimum: all of it.
        assert_eq!(
            context_window(window(3, 3, 2, 2), ContextMargin::Pixels(0), (40, 30)),
            window(0, 0, 40, 30)
        );
    }

    #[test]
    fn context_and_region_parse() {
        assert_eq!(
            ContextMargin::parse("64").unwrap(),
            ContextMargin::Pixels(64)
        );
        assert_eq!(
            ContextMargin::parse("0.25").unwrap(),
            ContextMargin::Fraction(0.25)
        );
        assert_eq!(
            ContextMargin::parse("25%").unwrap(),
            ContextMargin::Fraction(0.25)
        );
        for bad in ["", "-3", "1.5", "abc", "nan", "2000%"] {
            assert!(ContextMargin::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Window::parse("1, 2,3,4").unwrap(), window(1, 2, 3, 4));
        for bad in ["1,2,3", "1,2,0,4", "a,b,c,d"] {
            assert!(Window::parse(bad).is_err(), "{bad}");
        }
        assert!(window(90, 0, 20, 10).mask(100, 50).is_err());
        let mask = window(10, 5, 3, 2).mask(20, 10).unwrap();
        assert_eq!(mask_bounds(&mask), Some(window(10, 5, 3, 2)));
        assert_eq!(mask_bounds(&GrayImage::new(4, 4)), None);
    }

    #[test]
    fn the_feather_falls_to_zero_and_no_further() {
        let mask = window(10, 10, 4, 4).mask(40, 40).unwrap();
        let alpha = feathered(&mask, 3);
        let a = |x: usize, y: usize| alpha[y * 40 + x];
        assert_eq!(a(10, 10), 1.0);
        assert_eq!(a(13, 13), 1.0);
        assert!((a(14, 12) - 0.75).abs() < 1e-6, "{}", a(14, 12));
        assert!(a(16, 12) > 0.0 && a(16, 12) < a(15, 12));
        assert_eq!(a(17, 12), 0.0);
        assert_eq!(a(30, 30), 0.0);
        assert_eq!(feathered(&mask, 0)[14 * 40 + 14], 0.0);
    }
}
