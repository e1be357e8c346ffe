//! Canvas geometry: outpainting margins and the 16-pixel grid the model works on.

use image::{imageops, GrayImage, Luma, Rgb, RgbImage};

use crate::error::{PipelineError, Result};
use crate::image_io::{check_size, MAX_PIXELS};
use crate::latents::PIXELS_PER_TOKEN;
use icedit_image::resize::{resize_gray, resize_rgb, Filter};

/// Margins to add around an image for outpainting, in pixels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Margins {
    pub left: u32,
    pub top: u32,
    pub right: u32,
    pub bottom: u32,
}

impl Margins {
    /// Parses `L,T,R,B` (all four) or a single number for every side.
    pub fn parse(text: &str) -> Result<Self> {
        let bad = || {
            PipelineError::Input(format!(
                "--expand takes L,T,R,B in pixels (e.g. 0,0,256,0) or one number for all sides, got {text:?}"
            ))
        };
        let parts: Vec<u32> = text
            .split(',')
            .map(|p| p.trim().parse::<u32>().map_err(|_| bad()))
            .collect::<Result<_>>()?;
        match parts[..] {
            [all] => Ok(Self {
                left: all,
                top: all,
                right: all,
                bottom: all,
            }),
            [left, top, right, bottom] => Ok(Self {
                left,
                top,
                right,
                bottom,
            }),
            _ => Err(bad()),
        }
    }

    pub fn is_empty(&self) -> bool {
        [self.left, self.top, self.right, self.bottom] == [0; 4]
    }

    /// The size of a `width` x `height` image grown by these margins, if icedit can run on it.
    pub fn canvas_size(&self, width: u32, height: u32) -> Result<(u32, u32)> {
        let grow = |side: u32, a: u32, b: u32| side.checked_add(a)?.checked_add(b);
        let too_big = || {
            PipelineError::Input(format!(
                "--expand {},{},{},{} on a {width}x{height} image makes a canvas larger than \
                 icedit runs on ({:.1} MP); use smaller margins or a smaller image",
                self.left,
                self.top,
                self.right,
                self.bottom,
                MAX_PIXELS as f64 / 1e6
            ))
        };
        let cw = grow(width, self.left, self.right).ok_or_else(too_big)?;
        let ch = grow(height, self.top, self.bottom).ok_or_else(too_big)?;
        check_size(cw, ch, "the outpainting canvas")?;
        Ok((cw, ch))
    }
}

/// Outpainting: a canvas with the image pasted inside the margins and the new area masked
/// (white). An existing mask is carried over; without one, the source area is kept (black).
/// The new area's pixels are mid-gray; their value does not matter, since the pipeline zeroes
/// every masked pixel before encoding.
///
/// The canvas size is checked ([`check_size`]) before anything is allocated.
pub fn expand(
    image: &RgbImage,
    mask: Option<&GrayImage>,
    margins: Margins,
) -> Result<(RgbImage, GrayImage)> {
    let (w, h) = image.dimensions();
    let (cw, ch) = margins.canvas_size(w, h)?;
    let mut canvas = RgbImage::from_pixel(cw, ch, Rgb([127, 127, 127]));
    imageops::replace(&mut canvas, image, margins.left as i64, margins.top as i64);
    let mut new_mask = GrayImage::from_pixel(cw, ch, Luma([255]));
    let inner = mask.cloned().unwrap_or_else(|| GrayImage::new(w, h));
    imageops::replace(
        &mut new_mask,
        &inner,
        margins.left as i64,
        margins.top as i64,
    );
    Ok((canvas, new_mask))
}

/// The size the model runs at: each side floored to a multiple of 16, as diffusers does.
pub fn grid_size(width: u32, height: u32) -> (u32, u32) {
    let g = PIXELS_PER_TOKEN as u32;
    (width / g * g, height / g * g)
}

/// Resizes image and mask to the 16-pixel grid when they are not on it, as diffusers' image
/// processors do (PIL's Lanczos, reproduced exactly).
/// Returns a note for the user when a resize happened.
pub fn fit_to_grid(image: RgbImage, mask: GrayImage) -> (RgbImage, GrayImage, Option<String>) {
    let (w, h) = image.dimensions();
    let (gw, gh) = grid_size(w, h);
    if (gw, gh) == (w, h) {
        return (image, mask, None);
    }
    let image = resize_rgb(&image, gw, gh, Filter::Lanczos);
    let mask = resize_gray(&mask, gw, gh, Filter::Lanczos);
    let note = format!("resized {w}x{h} to {gw}x{gh}: the model works on multiples of 16 pixels");
    (image, mask, Some(note))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_margins() {
        assert_eq!(
            Margins::parse("1,2,3,4").unwrap(),
            Margins {
                left: 1,
                top: 2,
                right: 3,
                bottom: 4
            }
        );
        assert_eq!(Margins::parse("8").unwrap().bottom, 8);
        assert!(Margins::parse("1,2").is_err());
        assert!(Margins::parse("-1,0,0,0").is_err());
    }

    #[test]
    fn expand_masks_only_the_new_area() {
        let img = RgbImage::from_pixel(20, 20, Rgb([9, 9, 9]));
        let (canvas, mask) = expand(
            &img,
            None,
            Margins {
                left: 1,
                top: 0,
                right: 0,
                bottom: 1,
            },
        )
        .unwrap();
        assert_eq!(canvas.dimensions(), (21, 21));
        assert_eq!(canvas.get_pixel(1, 0).0, [9, 9, 9]);
        assert_eq!(mask.get_pixel(0, 0).0, [255]);
        assert_eq!(mask.get_pixel(1, 1).0, [0]);
        assert_eq!(mask.get_pixel(20, 20).0, [255]);
    }

    #[test]
    fn huge_margins_are_refused_before_allocating() {
        let img = RgbImage::new(64, 64);
        for text in ["4294967295", "0,0,4294967295,0", "100000", "0,0,0,70000"] {
            let margins = Margins::parse(text).unwrap();
            let err = expand(&img, None, margins).unwrap_err().to_string();
            assert!(
                err.contains("larger than") || err.contains("more than"),
                "{text}: {err}"
            );
        }
        let err = Margins::parse("4294967296").unwrap_err().to_string();
        assert!(err.contains("--expand"), "{err}");
    }

    #[test]
    fn grid_floors_to_16() {
        assert_eq!(grid_size(1000, 517), (992, 512));
        let (i, m, note) = fit_to_grid(RgbImage::new(32, 48), GrayImage::new(32, 48));
        assert_eq!(
            (i.dimensions(), m.dimensions(), note),
            ((32, 48), (32, 48), None)
        );
        let (i, _, note) = fit_to_grid(RgbImage::new(33, 50), GrayImage::new(33, 50));
        assert_eq!(i.dimensions(), (32, 48));
        assert!(note.is_some());
    }
}
