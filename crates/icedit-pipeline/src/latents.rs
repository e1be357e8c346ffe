//! The tensor plumbing between pixels, VAE latents and the transformer's packed tokens, laid out
//! exactly as diffusers' FLUX pipelines lay them out.

use candle_core::{DType, Device, Tensor};

use crate::error::{PipelineError, Result};

/// Pixels per latent cell (the VAE downsamples by 8).
pub const VAE_SCALE: usize = 8;
/// Pixels per packed token: 8 (VAE) x 2 (2x2 patches).
pub const PIXELS_PER_TOKEN: usize = VAE_SCALE * 2;

/// 2x2 patches of `[B, C, h, w]` latents into tokens `[B, (h/2)*(w/2), C*4]`, channel
/// `c*4 + py*2 + px`, tokens in row-major order.
pub fn pack(latents: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = latents.dims4()?;
    if h % 2 != 0 || w % 2 != 0 {
        return Err(PipelineError::Input(format!(
            "latents must have an even height and width to be packed, got {h}x{w}"
        )));
    }
    Ok(latents
        .reshape((b, c, h / 2, 2, w / 2, 2))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((b, (h / 2) * (w / 2), c * 4))?)
}

/// Inverse of [`pack`] for latents of `h` x `w` cells.
pub fn unpack(tokens: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, n, c4) = tokens.dims3()?;
    if n != (h / 2) * (w / 2) || c4 % 4 != 0 {
        return Err(PipelineError::Input(format!(
            "cannot unpack {n} tokens of {c4} channels into a {h}x{w} latent grid"
        )));
    }
    Ok(tokens
        .reshape((b, h / 2, w / 2, c4 / 4, 2, 2))?
        .permute((0, 3, 1, 4, 2, 5))?
        .reshape((b, c4 / 4, h, w))?)
}

/// Position ids `(0, row, col)` of a `rows` x `cols` packed grid, `[rows*cols, 3]`.
pub fn image_ids(rows: usize, cols: usize, device: &Device) -> Result<Tensor> {
    let mut ids = Vec::with_capacity(rows * cols * 3);
    for r in 0..rows {
        for c in 0..cols {
            ids.extend_from_slice(&[0f32, r as f32, c as f32]);
        }
    }
    Ok(Tensor::from_vec(ids, (rows * cols, 3), device)?)
}

/// Text position ids: all zeros, `[len, 3]`.
pub fn text_ids(len: usize, device: &Device) -> Result<Tensor> {
    Ok(Tensor::zeros((len, 3), DType::F32, device)?)
}

/// The Fill model's mask channels: a binary pixel mask `[H, W]` (1 = regenerate) with each 8x8
/// pixel cell unshuffled into 64 channels (`dy*8 + dx`), then 2x2-packed: `[1, tokens, 256]`.
pub fn pack_mask(mask: &[f32], height: usize, width: usize, device: &Device) -> Result<Tensor> {
    if height % PIXELS_PER_TOKEN != 0 || width % PIXELS_PER_TOKEN != 0 {
        return Err(PipelineError::Input(format!(
            "mask size {width}x{height} must be a multiple of {PIXELS_PER_TOKEN}"
        )));
    }
    let (h, w) = (height / VAE_SCALE, width / VAE_SCALE);
    let cells = Tensor::from_slice(mask, (1, h, VAE_SCALE, w, VAE_SCALE), device)?
        .permute((0, 2, 4, 1, 3))?
        .reshape((1, VAE_SCALE * VAE_SCALE, h, w))?;
    pack(&cells)
}

/// Pixels `[H, W, 3]` (u8, row-major RGB) -> `[1, 3, H, W]` f32 in [-1, 1], computed as
/// diffusers does (`x / 255`, then `2x - 1`, in f32).
pub fn pixels_to_tensor(
    rgb: &[u8],
    height: usize,
    width: usize,
    device: &Device,
) -> Result<Tensor> {
    let mut planar = vec![0f32; 3 * height * width];
    for (i, px) in rgb.chunks_exact(3).enumerate() {
        for (c, &v) in px.iter().enumerate() {
            planar[c * height * width + i] = 2.0 * (v as f32 / 255.0) - 1.0;
        }
    }
    Ok(Tensor::from_vec(planar, (1, 3, height, width), device)?)
}

/// The VAE's output `[1, 3, H, W]` -> u8 RGB, as diffusers' postprocessing does: `x/2 + 0.5`
/// and the clamp in the decoder's dtype, then `round(255 * x)` in f32 (ties to even, as numpy).
pub fn tensor_to_pixels(image: &Tensor) -> Result<(Vec<u8>, usize, usize)> {
    let (b, c, h, w) = image.dims4()?;
    if b != 1 || c != 3 {
        return Err(PipelineError::Input(format!(
            "expected one RGB image [1, 3, H, W], got {:?}",
            image.dims()
        )));
    }
    let unit = ((image / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
    let planar = unit
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_device(&Device::Cpu)?
        .to_vec1::<f32>()?;
    let mut rgb = vec![0u8; h * w * 3];
    for i in 0..h * w {
        for ch in 0..3 {
            rgb[i * 3 + ch] = (planar[ch * h * w + i] * 255.0).round_ties_even() as u8;
        }
    }
    Ok((rgb, h, w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_then_unpack_is_identity() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, (2 * 3 * 4 * 6) as f32, &dev)
            .unwrap()
            .reshape((2, 3, 4, 6))
            .unwrap();
        let packed = pack(&x).unwrap();
        assert_eq!(packed.dims(), &[2, 6, 12]);
        // Token 0 channel c*4 + py*2 + px is latent (c, py, px).
        let t0 = packed
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let expect: Vec<f32> = (0..3)
            .flat_map(|c| {
                [(0, 0), (0, 1), (1, 0), (1, 1)].map(|(py, px)| (c * 24 + py * 6 + px) as f32)
            })
            .collect();
        assert_eq!(t0, expect);
        let back = unpack(&packed, 4, 6).unwrap();
        let diff = (back - &x).unwrap().abs().unwrap().sum_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn mask_channels_follow_the_reference_order() {
        // A single set pixel at (y, x) = (9, 3) is in latent cell (1, 0), offset (1, 3): channel
        // dy*8+dx = 11 of cell (1,0); packed: token 0 (cells 0..2 x 0..2), py=1, px=0.
        let (h, w) = (16, 16);
        let mut mask = vec![0f32; h * w];
        mask[9 * w + 3] = 1.0;
        let packed = pack_mask(&mask, h, w, &Device::Cpu).unwrap();
        assert_eq!(packed.dims(), &[1, 1, 256]);
        let v = packed.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let hot: Vec<usize> = v
            .iter()
            .enumerate()
            .filter(|(_, &x)| x != 0.0)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(hot, vec![11 * 4 + 2]);
    }

    #[test]
    fn pixel_round_trip() {
        let rgb: Vec<u8> = (0..=255u8).flat_map(|v| [v, 255 - v, v / 2]).collect();
        let t = pixels_to_tensor(&rgb, 16, 16, &Device::Cpu).unwrap();
        let (back, h, w) = tensor_to_pixels(&t).unwrap();
        assert_eq!((h, w), (16, 16));
        assert_eq!(back, rgb);
    }
}
