//! Reading user images and masks (any common format, converted to what the model takes) and
//! writing results as PNG with their recipe in the metadata, atomically.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use image::{DynamicImage, GrayImage, ImageReader, RgbImage};

use crate::error::{PipelineError, Result};

/// Largest image icedit will run on, in pixels (the model's cost grows with the square of the
/// token count; FLUX was trained up to about 2 megapixels).
pub const MAX_PIXELS: u64 = 2048 * 2048;
/// Largest side icedit will decode at all (guards against decompression bombs).
const MAX_DECODE_SIDE: u32 = 16384;

/// An input image converted to 8-bit RGB, with a note of what conversion was needed.
pub struct LoadedImage {
    pub rgb: RgbImage,
    /// e.g. "RGBA converted to RGB (alpha dropped)"; None when the file was 8-bit RGB.
    pub conversion: Option<String>,
}

fn open(path: &Path) -> Result<DynamicImage> {
    let image_err = |message: String| PipelineError::Image {
        path: path.to_path_buf(),
        message,
    };
    let mut reader = ImageReader::open(path)
        .map_err(|e| image_err(e.to_string()))?
        .with_guessed_format()
        .map_err(|e| image_err(e.to_string()))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_DECODE_SIDE);
    limits.max_image_height = Some(MAX_DECODE_SIDE);
    reader.limits(limits);
    if reader.format().is_none() {
        return Err(image_err(
            "not a recognised image format (PNG, JPEG, WebP, BMP or TIFF)".into(),
        ));
    }
    reader.decode().map_err(|e| {
        image_err(format!(
            "{e} (is the file complete and really an image? re-export it as PNG)"
        ))
    })
}

/// Reads an image as 8-bit RGB. Alpha is dropped (as PIL's `convert("RGB")` does), grayscale is
/// replicated to three channels, 16-bit and float images are scaled to 8 bits.
pub fn load_rgb(path: &Path) -> Result<LoadedImage> {
    let image = open(path)?;
    let conversion = match &image {
        DynamicImage::ImageRgb8(_) => None,
        DynamicImage::ImageRgba8(_) => Some("RGBA converted to RGB (alpha dropped)".to_string()),
        DynamicImage::ImageLuma8(_) | DynamicImage::ImageLumaA8(_) => {
            Some("grayscale converted to RGB".to_string())
        }
        other => Some(format!("{:?} converted to 8-bit RGB", other.color())),
    };
    Ok(LoadedImage {
        rgb: image.to_rgb8(),
        conversion,
    })
}

/// Reads a mask as 8-bit luminance the way PIL's `convert("L")` computes it from RGB
/// (ITU-R 601 weights in 16-bit fixed point, alpha ignored).
pub fn load_mask(path: &Path) -> Result<GrayImage> {
    let image = open(path)?;
    Ok(match image {
        DynamicImage::ImageLuma8(gray) => gray,
        DynamicImage::ImageLumaA8(_)
        | DynamicImage::ImageLuma16(_)
        | DynamicImage::ImageLumaA16(_) => image.to_luma8(),
        other => {
            let rgb = other.to_rgb8();
            GrayImage::from_fn(rgb.width(), rgb.height(), |x, y| {
                let [r, g, b] = rgb.get_pixel(x, y).0;
                let l = (r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16;
                image::Luma([l as u8])
            })
        }
    })
}

/// Binarises a mask as diffusers does (`x/255 >= 0.5`, i.e. values 128..=255 are 1).
pub fn binarize(mask: &GrayImage) -> Vec<f32> {
    mask.pixels()
        .map(|p| {
            if p.0[0] as f32 / 255.0 >= 0.5 {
                1.0
            } else {
                0.0
            }
        })
        .collect()
}

/// Refuses images the model should not be run on, with the fix.
pub fn check_size(width: u32, height: u32, what: &str) -> Result<()> {
    let pixels = width as u64 * height as u64;
    if pixels > MAX_PIXELS {
        let scale = (MAX_PIXELS as f64 / pixels as f64).sqrt();
        return Err(PipelineError::Input(format!(
            "{what} is {width}x{height} ({:.1} MP), more than the {:.1} MP icedit runs on; \
             resize it first, e.g. to {}x{}",
            pixels as f64 / 1e6,
            MAX_PIXELS as f64 / 1e6,
            (width as f64 * scale) as u32 / 16 * 16,
            (height as f64 * scale) as u32 / 16 * 16,
        )));
    }
    if width < 16 || height < 16 {
        return Err(PipelineError::Input(format!(
            "{what} is {width}x{height}; it must be at least 16x16 pixels"
        )));
    }
    Ok(())
}

/// Writes an RGB PNG with text metadata (UTF-8 iTXt chunks). The PNG is written to a temporary
/// file next to `path` and renamed into place, so a failure never leaves a partial file and an
/// existing file is replaced only by a complete one.
pub fn save_png(path: &Path, image: &RgbImage, metadata: &[(&str, String)]) -> Result<()> {
    let out_err = |message: String| PipelineError::Output {
        path: path.to_path_buf(),
        message,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(out_err(format!(
            "the folder {} does not exist",
            dir.display()
        )));
    }
    let mut temp = tempfile::Builder::new()
        .prefix(".icedit-")
        .suffix(".png.tmp")
        .tempfile_in(&dir)
        .map_err(|e| out_err(format!("cannot create a file in {}: {e}", dir.display())))?;
    {
        let mut encoder = png::Encoder::new(
            BufWriter::new(temp.as_file_mut()),
            image.width(),
            image.height(),
        );
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        for (key, value) in metadata {
            encoder
                .add_itxt_chunk(key.to_string(), value.clone())
                .map_err(|e| out_err(format!("metadata {key}: {e}")))?;
        }
        let mut writer = encoder.write_header().map_err(|e| out_err(e.to_string()))?;
        writer
            .write_image_data(image.as_raw())
            .map_err(|e| out_err(e.to_string()))?;
        writer.finish().map_err(|e| out_err(e.to_string()))?;
    }
    temp.as_file_mut()
        .flush()
        .and_then(|_| temp.as_file().sync_all())
        .map_err(|e| out_err(e.to_string()))?;
    // Temp files are created private (0600); a result is an ordinary file for the user.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(temp.path(), std::fs::Permissions::from_mode(0o644))
            .map_err(|e| out_err(e.to_string()))?;
    }
    temp.persist(path)
        .map_err(|e| out_err(e.error.to_string()))?;
    Ok(())
}

/// Reads the iTXt/tEXt metadata of a PNG (used to check what we wrote, and by users' tools).
pub fn read_png_metadata(path: &Path) -> Result<Vec<(String, String)>> {
    let file = std::fs::File::open(path).map_err(|source| PipelineError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let reader = decoder.read_info().map_err(|e| PipelineError::Image {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let info = reader.info();
    let mut out: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|c| (c.keyword.clone(), c.text.clone()))
        .collect();
    for chunk in &info.utf8_text {
        let text = chunk.get_text().map_err(|e| PipelineError::Image {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        out.push((chunk.keyword.clone(), text));
    }
    Ok(out)
}

/// The largest per-channel difference between two images of one size, in 8-bit levels (how
/// results are compared with a reference).
pub fn max_pixel_diff(a: &RgbImage, b: &RgbImage) -> Result<u8> {
    if a.dimensions() != b.dimensions() {
        return Err(PipelineError::Input(format!(
            "cannot compare a {:?} image with a {:?} one",
            a.dimensions(),
            b.dimensions()
        )));
    }
    Ok(a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binarize_threshold_is_half() {
        let m = GrayImage::from_raw(4, 1, vec![0, 127, 128, 255]).unwrap();
        assert_eq!(binarize(&m), vec![0.0, 0.0, 1.0, 1.0]);
    }

    #[test]
    fn png_round_trip_keeps_metadata_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.png");
        let img = RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 40, y as u8 * 80, 7]));
        save_png(
            &path,
            &img,
            &[("icedit", "{\"prompt\":\"café 🎉\"}".into())],
        )
        .unwrap();
        let back = image::open(&path).unwrap().to_rgb8();
        assert_eq!(back, img);
        let meta = read_png_metadata(&path).unwrap();
        assert_eq!(
            meta,
            vec![("icedit".to_string(), "{\"prompt\":\"café 🎉\"}".to_string())]
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("out.png")]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o644);
        }
    }

    #[test]
    fn missing_output_folder_is_a_clear_error() {
        let img = RgbImage::new(2, 2);
        let err = save_png(Path::new("/nonexistent-dir/x.png"), &img, &[]).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    #[test]
    fn size_limits() {
        assert!(check_size(1024, 1024, "image").is_ok());
        let err = check_size(4000, 3000, "image").unwrap_err().to_string();
        assert!(err.contains("resize it first"), "{err}");
        assert!(check_size(8, 64, "image").is_err());
    }
}
