//! Reading user images and masks (any common format, converted to what the model takes) and
//! writing results as PNG with their recipe in the metadata, atomically.

use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use image::metadata::Orientation;
use image::{DynamicImage, GrayImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};

use crate::error::{PipelineError, Result};

/// Largest image icedit will run on, in pixels (the model's cost grows with the square of the
/// token count; FLUX was trained up to about 2 megapixels).
pub const MAX_PIXELS: u64 = 2048 * 2048;
/// Largest side icedit will decode at all (guards against decompression bombs).
const MAX_DECODE_SIDE: u32 = 16384;

/// Largest image file icedit reads, in bytes (a 16384-pixel-wide PNG of noise is ~800 MB; a
/// photo is a few MB).
const MAX_FILE_BYTES: u64 = 1 << 30;

/// An input image converted to 8-bit RGB, with notes on what was done to it.
pub struct LoadedImage {
    pub rgb: RgbImage,
    /// e.g. "RGBA converted to RGB (alpha dropped)", "rotated as its EXIF orientation says";
    /// empty when the file was plain 8-bit RGB.
    pub notes: Vec<String>,
}

/// Decodes an image file: refuses what is not a complete image, applies the EXIF orientation
/// (as diffusers' `load_image` does with `ImageOps.exif_transpose`) and notes what it did.
fn open(path: &Path) -> Result<(DynamicImage, Vec<String>)> {
    let image_err = |message: String| PipelineError::Image {
        path: path.to_path_buf(),
        message,
    };
    // Only regular files: a pipe or a device would block or never end.
    let meta = std::fs::metadata(path).map_err(|e| image_err(e.to_string()))?;
    if !meta.is_file() {
        return Err(image_err(
            "not a regular file (a pipe, device or folder is not read)".into(),
        ));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(image_err(format!(
            "{} bytes is larger than any photo icedit takes ({MAX_FILE_BYTES} bytes)",
            meta.len()
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| image_err(e.to_string()))?;
    decode(&bytes, path)
}

/// Decodes image bytes, `path` naming them in errors.
fn decode(bytes: &[u8], path: &Path) -> Result<(DynamicImage, Vec<String>)> {
    let image_err = |message: String| PipelineError::Image {
        path: path.to_path_buf(),
        message,
    };
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| image_err(e.to_string()))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_DECODE_SIDE);
    limits.max_image_height = Some(MAX_DECODE_SIDE);
    reader.limits(limits);
    let Some(format) = reader.format() else {
        return Err(image_err(
            "not a recognised image format (PNG, JPEG, WebP, BMP or TIFF)".into(),
        ));
    };
    if format == ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        // The decoder would fill the missing rows with gray; PIL refuses such a file.
        return Err(image_err(
            "the JPEG is truncated (its data ends before the image does); is the file complete?"
                .into(),
        ));
    }
    let mut notes = Vec::new();
    if is_animated(format, bytes) {
        notes.push("an animated image: its first frame is used".to_string());
    }
    let bad_image = |e: image::ImageError| {
        image_err(format!(
            "{e} (is the file complete and really an image? re-export it as PNG)"
        ))
    };
    let mut decoder = reader.into_decoder().map_err(bad_image)?;
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(bad_image)?;
    if orientation != Orientation::NoTransforms {
        image.apply_orientation(orientation);
        notes.push(format!(
            "turned upright as its EXIF orientation says ({orientation:?})"
        ));
    }
    Ok((image, notes))
}

/// Whether a JPEG's last scan is closed by the end-of-image marker. Inside entropy-coded data
/// 0xFF is always followed by 0x00 or a restart marker, so FF DA (start of scan) and FF D9 (end
/// of image) can only be markers there.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let marker = |m: u8| move |w: &[u8]| w == [0xFF, m];
    match bytes.windows(2).rposition(marker(0xDA)) {
        Some(last_scan) => bytes[last_scan..].windows(2).any(marker(0xD9)),
        None => false,
    }
}

/// Animated PNG (an `acTL` chunk) or WebP (the animation flag).
fn is_animated(format: ImageFormat, bytes: &[u8]) -> bool {
    match format {
        ImageFormat::Png => png::Decoder::new(Cursor::new(bytes))
            .read_info()
            .is_ok_and(|r| r.info().animation_control.is_some()),
        ImageFormat::WebP => image::codecs::webp::WebPDecoder::new(Cursor::new(bytes))
            .is_ok_and(|d| d.has_animation()),
        _ => false,
    }
}

/// Reads an image as 8-bit RGB. Alpha is dropped (as PIL's `convert("RGB")` does), grayscale is
/// replicated to three channels, 16-bit and float images are scaled to 8 bits.
pub fn load_rgb(path: &Path) -> Result<LoadedImage> {
    let (image, notes) = open(path)?;
    Ok(into_rgb(image, notes))
}

/// [`load_rgb`] of bytes already in memory (an upload), `name` naming them in errors.
pub fn decode_rgb(bytes: &[u8], name: &str) -> Result<LoadedImage> {
    let (image, notes) = decode(bytes, Path::new(name))?;
    Ok(into_rgb(image, notes))
}

/// [`load_mask`] of bytes already in memory (an upload), `name` naming them in errors.
pub fn decode_mask(bytes: &[u8], name: &str) -> Result<GrayImage> {
    let (image, _) = decode(bytes, Path::new(name))?;
    Ok(into_mask(image))
}

fn into_rgb(image: DynamicImage, mut notes: Vec<String>) -> LoadedImage {
    let conversion = match &image {
        DynamicImage::ImageRgb8(_) => None,
        DynamicImage::ImageRgba8(_) => Some("RGBA converted to RGB (alpha dropped)".to_string()),
        DynamicImage::ImageLuma8(_) | DynamicImage::ImageLumaA8(_) => {
            Some("grayscale converted to RGB".to_string())
        }
        other => Some(format!("{:?} converted to 8-bit RGB", other.color())),
    };
    notes.extend(conversion);
    LoadedImage {
        rgb: image.into_rgb8(),
        notes,
    }
}

/// Reads a mask as 8-bit luminance the way PIL's `convert("L")` computes it from RGB
/// (ITU-R 601 weights in 16-bit fixed point, alpha ignored), upright by its EXIF orientation.
pub fn load_mask(path: &Path) -> Result<GrayImage> {
    let (image, _) = open(path)?;
    Ok(into_mask(image))
}

/// A mask whose edit region is where the image is fully transparent (OpenAI's images API
/// convention), as white on black; an image without alpha is read as [`load_mask`] does.
pub fn decode_alpha_mask(bytes: &[u8], name: &str) -> Result<GrayImage> {
    let (image, _) = decode(bytes, Path::new(name))?;
    if !image.color().has_alpha() {
        return Ok(into_mask(image));
    }
    let rgba = image.to_rgba8();
    Ok(GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        image::Luma([if rgba.get_pixel(x, y).0[3] == 0 {
            255
        } else {
            0
        }])
    }))
}

fn into_mask(image: DynamicImage) -> GrayImage {
    match image {
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
    }
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

/// Widest aspect ratio FLUX handles well (its training buckets reach about 4:1).
const MAX_ASPECT: f64 = 4.0;

/// A warning for images far outside the aspect ratios FLUX was trained on, where the result
/// is poor and the run costs as much as a good one.
pub fn aspect_warning(width: u32, height: u32, what: &str) -> Option<String> {
    let (long, short) = (width.max(height) as f64, width.min(height).max(1) as f64);
    (long / short > MAX_ASPECT).then(|| {
        format!(
            "{what} is {width}x{height}, an aspect ratio of {:.0}:1; FLUX works well up to about \
             {MAX_ASPECT}:1, so expect a poor result: crop the photo first",
            long / short
        )
    })
}

/// Writes an RGB PNG with text metadata (UTF-8 iTXt chunks), atomically
/// ([`write_file_atomically`]).
pub fn save_png(path: &Path, image: &RgbImage, metadata: &[(&str, String)]) -> Result<()> {
    let bytes = png_bytes(image, metadata).map_err(|message| PipelineError::Output {
        path: path.to_path_buf(),
        message,
    })?;
    write_file_atomically(path, &bytes)
}

/// An RGB PNG with text chunks (the recipe), in memory.
pub fn png_bytes(
    image: &RgbImage,
    metadata: &[(&str, String)],
) -> std::result::Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, image.width(), image.height());
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    for (key, value) in metadata {
        encoder
            .add_itxt_chunk(key.to_string(), value.clone())
            .map_err(|e| format!("metadata {key}: {e}"))?;
    }
    let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
    writer
        .write_image_data(image.as_raw())
        .map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())?;
    Ok(bytes)
}

/// Writes a file as a whole or not at all: the bytes go to a temporary file next to `path`,
/// which is renamed into place, so a failure never leaves a partial file and an existing file
/// is replaced only by a complete one.
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically(path, |file| {
        file.write_all(bytes).map_err(|e| PipelineError::Output {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    })
}

/// Temporary files being written now: a signal handler removes them ([`remove_partial_outputs`]),
/// since a process stopped by a signal runs no destructors.
static IN_PROGRESS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Removes the temporary files of writes in progress; for a SIGINT/SIGTERM handler, before exit.
pub fn remove_partial_outputs() {
    let mut pending = IN_PROGRESS.lock().unwrap_or_else(|e| e.into_inner());
    for path in pending.drain(..) {
        let _ = std::fs::remove_file(path);
    }
}

/// Unregisters a temporary file when its write ends, however it ends.
struct InProgress(PathBuf);

impl InProgress {
    fn new(path: &Path) -> Self {
        let mut pending = IN_PROGRESS.lock().unwrap_or_else(|e| e.into_inner());
        pending.push(path.to_path_buf());
        Self(path.to_path_buf())
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        let mut pending = IN_PROGRESS.lock().unwrap_or_else(|e| e.into_inner());
        pending.retain(|p| p != &self.0);
    }
}

fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> Result<()>,
) -> Result<()> {
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
        .suffix(".tmp")
        .tempfile_in(&dir)
        .map_err(|e| out_err(format!("cannot create a file in {}: {e}", dir.display())))?;
    let _registered = InProgress::new(temp.path());
    write(temp.as_file_mut())?;
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
    fn truncated_jpegs_and_pipes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let img = RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8 * 4, y as u8 * 4, 9]));
        let jpeg = dir.path().join("full.jpg");
        img.save(&jpeg).unwrap();
        assert!(load_rgb(&jpeg).is_ok());
        let bytes = std::fs::read(&jpeg).unwrap();
        for keep in [bytes.len() - 2, bytes.len() / 2, bytes.len() * 3 / 4] {
            let cut = dir.path().join(format!("cut{keep}.jpg"));
            std::fs::write(&cut, &bytes[..keep]).unwrap();
            let err = load_rgb(&cut)
                .err()
                .expect("truncated JPEG refused")
                .to_string();
            assert!(
                err.contains("truncated") || err.contains("complete"),
                "{err}"
            );
        }
        // Extra bytes after the end of the image are fine (cameras append data there).
        let trailing = dir.path().join("trailing.jpg");
        std::fs::write(&trailing, [&bytes[..], b"trailer"].concat()).unwrap();
        assert!(load_rgb(&trailing).is_ok());
        let err = load_rgb(dir.path()).err().unwrap().to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }

    #[test]
    fn exif_orientation_is_applied_and_said() {
        // A 2x1 JPEG (left red, right blue) whose EXIF says "rotate 90 CW" (orientation 6).
        let dir = tempfile::tempdir().unwrap();
        let img = RgbImage::from_fn(32, 16, |x, _| {
            if x < 16 {
                image::Rgb([255, 0, 0])
            } else {
                image::Rgb([0, 0, 255])
            }
        });
        let plain = dir.path().join("plain.jpg");
        img.save(&plain).unwrap();
        let bytes = std::fs::read(&plain).unwrap();
        // APP1 Exif segment: big-endian TIFF with one IFD entry, Orientation (0x0112) = 6.
        let mut exif = b"Exif\0\0MM\0\x2a\0\0\0\x08\0\x01".to_vec();
        exif.extend([0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0, 0, 0, 0, 0]);
        let mut app1 = vec![0xFF, 0xE1];
        app1.extend(((exif.len() + 2) as u16).to_be_bytes());
        app1.extend(&exif);
        let rotated = dir.path().join("rotated.jpg");
        std::fs::write(&rotated, [&bytes[..2], &app1[..], &bytes[2..]].concat()).unwrap();
        let loaded = load_rgb(&rotated).unwrap();
        assert_eq!(loaded.rgb.dimensions(), (16, 32));
        assert!(
            loaded.notes.iter().any(|n| n.contains("EXIF")),
            "{:?}",
            loaded.notes
        );
        // Turned clockwise: the left (red) half is now on top.
        assert!(loaded.rgb.get_pixel(8, 4).0[0] > 200);
        assert!(loaded.rgb.get_pixel(8, 28).0[2] > 200);
        assert!(load_rgb(&plain).unwrap().notes.is_empty());
    }

    #[test]
    fn animated_images_use_their_first_frame_and_say_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("anim.png");
        let (w, h) = (4u32, 3u32);
        {
            let file = std::fs::File::create(&path).unwrap();
            let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), w, h);
            encoder.set_color(png::ColorType::Rgb);
            encoder.set_depth(png::BitDepth::Eight);
            encoder.set_animated(2, 0).unwrap();
            let mut writer = encoder.write_header().unwrap();
            writer.write_image_data(&[10; 36]).unwrap();
            writer.write_image_data(&[200; 36]).unwrap();
            writer.finish().unwrap();
        }
        let loaded = load_rgb(&path).unwrap();
        assert_eq!(loaded.rgb.get_pixel(0, 0).0, [10, 10, 10]);
        assert!(
            loaded.notes.iter().any(|n| n.contains("first frame")),
            "{:?}",
            loaded.notes
        );
        // A still PNG has no such note.
        let still = dir.path().join("still.png");
        save_png(&still, &RgbImage::new(w, h), &[]).unwrap();
        assert!(load_rgb(&still).unwrap().notes.is_empty());
    }

    #[test]
    fn extreme_aspect_ratios_are_warned_about() {
        assert!(aspect_warning(1024, 512, "the diptych").is_none());
        assert!(aspect_warning(1024, 16, "the diptych").is_some());
        assert!(aspect_warning(16, 8000, "the canvas").is_some());
    }

    #[test]
    fn size_limits() {
        assert!(check_size(1024, 1024, "image").is_ok());
        let err = check_size(4000, 3000, "image").unwrap_err().to_string();
        assert!(err.contains("resize it first"), "{err}");
        assert!(check_size(8, 64, "image").is_err());
    }
}
