//! A judge without a language model: CLIP (ViT-L/14 by default) scores each edit by
//!
//! - direction: how well the change in image embedding (edit - original) follows the change
//!   in text embedding (instruction - a caption of the source), as in InstructPix2Pix's
//!   "CLIP directional similarity";
//! - similarity: the edit's image embedding against the original's, so that an edit that
//!   leaves the rest of the photo alone counts for more.
//!
//! score = direction + weight x similarity, the higher the better. Cheap and deterministic,
//! it is the fallback of choice behind a vision-language model.
//!
//! The model is transformers' `CLIPModel` (icedit-text's, whose text tower FLUX also uses),
//! the preprocessing `CLIPImageProcessor`'s with PIL's bicubic resize.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use icedit_image::resize::{resize_rgb, Filter};
use icedit_text::{ClipModel, PromptTokenizer};
use image::RgbImage;

use crate::{Comparison, Judge, JudgeError, Preference, Result, Verdict};

/// The model `clip` uses when none is named.
pub const DEFAULT_CLIP_MODEL: &str = "openai/clip-vit-large-patch14";

/// How the CLIP judge weighs its two terms.
#[derive(Debug, Clone)]
pub struct ClipScoring {
    /// What the source photo shows, the start of the text direction.
    pub source_caption: String,
    /// Weight of the similarity to the original against the direction term.
    pub similarity_weight: f64,
}

impl Default for ClipScoring {
    fn default() -> Self {
        Self {
            source_caption: "a photo".into(),
            similarity_weight: 0.5,
        }
    }
}

/// One edit's score and its parts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClipScore {
    pub direction: f64,
    pub similarity: f64,
    pub score: f64,
}

/// `CLIPImageProcessor`'s settings (preprocessor_config.json), old and new layouts.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipPreprocess {
    /// The shorter side is resized to this.
    pub shortest_edge: u32,
    /// Then the centre is cut to this (height, width).
    pub crop: (u32, u32),
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for ClipPreprocess {
    fn default() -> Self {
        Self {
            shortest_edge: 224,
            crop: (224, 224),
            mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
        }
    }
}

impl ClipPreprocess {
    /// Reads preprocessor_config.json: `size` is `224` or `{"shortest_edge": 224}`, `crop_size`
    /// `224` or `{"height": .., "width": ..}`. Only the bicubic, resize-crop-normalise
    /// processor is supported; anything else is an error rather than a silent difference.
    pub fn from_file(path: &Path) -> std::result::Result<Self, String> {
        let text = icedit_flux::files::read_text_file(path, icedit_flux::files::MAX_CONFIG_BYTES)
            .map_err(|e| e.to_string())?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        let mut out = Self::default();
        let flag = |key: &str| value.get(key).and_then(|v| v.as_bool()).unwrap_or(true);
        for key in ["do_resize", "do_center_crop", "do_rescale", "do_normalize"] {
            if !flag(key) {
                return Err(format!("`{key}: false` is not supported"));
            }
        }
        if let Some(resample) = value.get("resample").and_then(|v| v.as_u64()) {
            if resample != 3 {
                return Err(format!(
                    "resample {resample} is not supported (3, bicubic, is)"
                ));
            }
        }
        if let Some(scale) = value.get("rescale_factor").and_then(|v| v.as_f64()) {
            if (scale - 1.0 / 255.0).abs() > 1e-9 {
                return Err(format!(
                    "rescale_factor {scale} is not supported (1/255 is)"
                ));
            }
        }
        let number = |v: &serde_json::Value| v.as_u64().map(|n| n as u32);
        match value.get("size") {
            None => {}
            Some(v) => {
                out.shortest_edge = number(v)
                    .or_else(|| v.get("shortest_edge").and_then(number))
                    .ok_or_else(|| format!("`size` {v} has no shortest_edge"))?;
            }
        }
        match value.get("crop_size") {
            None => {}
            Some(v) => {
                out.crop = match number(v) {
                    Some(n) => (n, n),
                    None => (
                        v.get("height")
                            .and_then(number)
                            .ok_or("crop_size has no height")?,
                        v.get("width")
                            .and_then(number)
                            .ok_or("crop_size has no width")?,
                    ),
                }
            }
        }
        let triple = |key: &str, into: &mut [f32; 3]| -> std::result::Result<(), String> {
            if let Some(v) = value.get(key) {
                let values: Vec<f32> =
                    serde_json::from_value(v.clone()).map_err(|e| format!("`{key}`: {e}"))?;
                *into = values
                    .try_into()
                    .map_err(|_| format!("`{key}` needs three values"))?;
            }
            Ok(())
        };
        triple("image_mean", &mut out.mean)?;
        triple("image_std", &mut out.std)?;
        if out.shortest_edge == 0 || out.crop.0 == 0 || out.crop.1 == 0 {
            return Err("sizes must be positive".into());
        }
        Ok(out)
    }

    /// The image as `pixel_values` `[1, 3, crop_h, crop_w]`: shorter side resized (PIL bicubic),
    /// centre cropped, scaled to [0, 1] and normalised.
    pub fn pixel_values(&self, image: &RgbImage, device: &Device) -> Result<Tensor> {
        let (w, h) = image.dimensions();
        if w == 0 || h == 0 {
            return Err(failed("clip", "empty image"));
        }
        // transformers' get_resize_output_image_size(default_to_square=False): the long side
        // is scaled and truncated.
        let (short, long) = if w <= h { (w, h) } else { (h, w) };
        let new_long = (self.shortest_edge as u64 * long as u64 / short as u64) as u32;
        let (rw, rh) = if w <= h {
            (self.shortest_edge, new_long)
        } else {
            (new_long, self.shortest_edge)
        };
        let resized = if (rw, rh) == (w, h) {
            image.clone()
        } else {
            resize_rgb(image, rw, rh, Filter::Bicubic)
        };
        let (ch, cw) = self.crop;
        if ch > rh || cw > rw {
            return Err(failed(
                "clip",
                &format!("crop {cw}x{ch} is larger than the resized image {rw}x{rh}"),
            ));
        }
        let (top, left) = ((rh - ch) / 2, (rw - cw) / 2);
        let mut data = vec![0f32; 3 * (ch * cw) as usize];
        let plane = (ch * cw) as usize;
        for y in 0..ch {
            for x in 0..cw {
                let p = resized.get_pixel(left + x, top + y);
                for c in 0..3 {
                    // As the processor: rescaled in f64, normalised in f32.
                    let v = (p[c] as f64 * (1.0 / 255.0)) as f32;
                    data[c * plane + (y * cw + x) as usize] = (v - self.mean[c]) / self.std[c];
                }
            }
        }
        Ok(Tensor::from_vec(
            data,
            (1, 3, ch as usize, cw as usize),
            device,
        )?)
    }
}

/// A CLIP model folder ready to embed: icedit-text's `CLIPModel`, its tokenizer and its image
/// processor.
pub struct ClipEmbedder {
    model: ClipModel,
    tokenizer: PromptTokenizer,
    preprocess: ClipPreprocess,
    device: Device,
}

impl ClipEmbedder {
    /// Loads `dir`: config.json, model.safetensors, the tokenizer files and
    /// preprocessor_config.json (openai/clip-vit-large-patch14's layout), in f32 on `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let fail = |message: String| JudgeError::Load {
            judge: "clip".into(),
            path: dir.to_path_buf(),
            message,
        };
        let model = ClipModel::load(dir, DType::F32, device).map_err(|e| fail(e.to_string()))?;
        let tokenizer = PromptTokenizer::clip(dir).map_err(|e| fail(e.to_string()))?;
        let preprocessor = dir.join("preprocessor_config.json");
        let preprocess = if preprocessor.is_file() {
            ClipPreprocess::from_file(&preprocessor)
                .map_err(|m| fail(format!("preprocessor_config.json: {m}")))?
        } else {
            ClipPreprocess::default()
        };
        let size = model.vision.config().image_size as u32;
        if preprocess.crop != (size, size) {
            return Err(fail(format!(
                "the image processor crops to {:?} (height, width) but the model takes \
                 {size}x{size} images",
                preprocess.crop
            )));
        }
        Ok(Self {
            model,
            tokenizer,
            preprocess,
            device: device.clone(),
        })
    }

    pub fn pixel_values(&self, image: &RgbImage) -> Result<Tensor> {
        self.preprocess.pixel_values(image, &self.device)
    }

    /// `get_image_features` of `pixel_values` `[batch, 3, H, W]`: projected, not normalised.
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.model.image_features(pixel_values).map_err(text_error)
    }

    /// Token ids as transformers' CLIP tokenizer gives them (`truncation=True`, at most 77).
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>> {
        let max = self.model.text.config().max_position_embeddings;
        let encoded = self.tokenizer.encode(text, max).map_err(text_error)?;
        let len = encoded.untruncated_len.min(max);
        Ok(encoded.ids[..len].to_vec())
    }

    /// `get_text_features` of one text `[1, projection_dim]`: projected, not normalised.
    pub fn text_features(&self, text: &str) -> Result<Tensor> {
        let ids = self.token_ids(text)?;
        let ids = Tensor::from_vec(ids.clone(), (1, ids.len()), &self.device)?;
        self.model.text_features(&ids).map_err(text_error)
    }
}

fn text_error(e: icedit_text::TextError) -> JudgeError {
    failed("clip", &e.to_string())
}

/// The `clip` judge: [`ClipModel`] embeddings scored as the module explains, with the
/// embeddings of texts and images it has already seen kept (a tournament shows the running
/// best and the original again and again).
pub struct ClipJudge {
    name: String,
    model: ClipEmbedder,
    scoring: ClipScoring,
    texts: HashMap<String, Vec<f64>>,
    images: HashMap<u64, Vec<f64>>,
}

impl ClipJudge {
    pub fn new(name: String, model: ClipEmbedder, scoring: ClipScoring) -> Self {
        Self {
            name,
            model,
            scoring,
            texts: HashMap::new(),
            images: HashMap::new(),
        }
    }

    /// Loads the model from a folder; `name` is how verdicts name the judge.
    pub fn load(name: String, dir: &Path, scoring: ClipScoring, device: &Device) -> Result<Self> {
        Ok(Self::new(name, ClipEmbedder::load(dir, device)?, scoring))
    }

    fn text_embedding(&mut self, text: &str) -> Result<Vec<f64>> {
        if let Some(e) = self.texts.get(text) {
            return Ok(e.clone());
        }
        let e = unit(&self.model.text_features(text)?)?;
        self.texts.insert(text.to_string(), e.clone());
        Ok(e)
    }

    fn image_embedding(&mut self, image: &RgbImage) -> Result<Vec<f64>> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        image.dimensions().hash(&mut hasher);
        image.as_raw().hash(&mut hasher);
        let key = hasher.finish();
        if let Some(e) = self.images.get(&key) {
            return Ok(e.clone());
        }
        let pixels = self.model.pixel_values(image)?;
        let e = unit(&self.model.image_features(&pixels)?)?;
        self.images.insert(key, e.clone());
        Ok(e)
    }

    /// Scores one edit of `original` made for `instruction`.
    pub fn score(
        &mut self,
        instruction: &str,
        edit: &RgbImage,
        original: &RgbImage,
    ) -> Result<ClipScore> {
        let caption = self.scoring.source_caption.clone();
        let text_direction = difference(
            &self.text_embedding(instruction)?,
            &self.text_embedding(&caption)?,
        );
        let edited = self.image_embedding(edit)?;
        let source = self.image_embedding(original)?;
        let direction = cosine(&difference(&edited, &source), &text_direction);
        let similarity = cosine(&edited, &source);
        Ok(ClipScore {
            direction,
            similarity,
            score: direction + self.scoring.similarity_weight * similarity,
        })
    }
}

impl Judge for ClipJudge {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn compare(&mut self, comparison: &Comparison) -> Result<Verdict> {
        let start = Instant::now();
        let first = self.score(
            comparison.instruction,
            comparison.first,
            comparison.original,
        )?;
        let second = self.score(
            comparison.instruction,
            comparison.second,
            comparison.original,
        )?;
        // Ties keep the first edit, the running best.
        let preference = if second.score > first.score {
            Preference::Second
        } else {
            Preference::First
        };
        let describe = |s: &ClipScore| {
            format!(
                "{:.4} (direction {:.4}, similarity {:.4})",
                s.score, s.direction, s.similarity
            )
        };
        Ok(Verdict {
            preference,
            judge: self.name(),
            answer: format!(
                "image 1: {}; image 2: {}",
                describe(&first),
                describe(&second)
            ),
            latency: start.elapsed(),
            warnings: Vec::new(),
        })
    }
}

/// A `[1, n]` embedding as a unit vector.
fn unit(embedding: &Tensor) -> Result<Vec<f64>> {
    let v: Vec<f64> = embedding
        .flatten_all()?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    Ok(v.iter().map(|x| x / norm).collect())
}

fn difference(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

/// Zero when either vector is zero (an edit identical to the original has no direction).
fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norms =
        a.iter().map(|x| x * x).sum::<f64>().sqrt() * b.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norms == 0.0 {
        0.0
    } else {
        dot / norms
    }
}

fn failed(judge: &str, message: &str) -> JudgeError {
    JudgeError::Failed {
        judge: judge.to_string(),
        message: message.to_string(),
    }
}

/// The files of a CLIP model folder: required ones first, then those used when present.
pub(crate) const CLIP_FILES: (&[&str], &[&str]) = (
    &["config.json", "model.safetensors"],
    &[
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
    ],
);
