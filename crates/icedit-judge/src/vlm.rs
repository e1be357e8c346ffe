//! The in-process vision-language judge: Qwen3-VL (Instruct, e.g. Qwen/Qwen3-VL-2B-Instruct)
//! on candle. The three images and the pairwise prompt go through the model's chat template;
//! one forward pass gives the next token's logits, and the judge prefers the edit whose digit
//! ("1" or "2") is more likely. No sampling, no parsing, deterministic.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use icedit_image::resize::{resize_rgb, Filter};
use image::RgbImage;
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::qwen3_vl::{patch_positions, weight_files, Prompt, Qwen3VlConfig, Qwen3VlModel};
use crate::{Comparison, Judge, JudgeError, Preference, Result, Verdict, PAIRWISE_TEMPLATE};

/// The model `qwen3-vl` uses when none is named.
pub const DEFAULT_VLM_MODEL: &str = "Qwen/Qwen3-VL-2B-Instruct";

/// `Qwen2VLImageProcessor`'s settings (preprocessor_config.json).
#[derive(Debug, Clone, PartialEq)]
pub struct VlmPreprocess {
    pub patch_size: u32,
    pub merge_size: u32,
    pub temporal_patch_size: u32,
    pub min_pixels: u64,
    pub max_pixels: u64,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for VlmPreprocess {
    fn default() -> Self {
        // Qwen3-VL's own.
        Self {
            patch_size: 16,
            merge_size: 2,
            temporal_patch_size: 2,
            min_pixels: 65_536,
            max_pixels: 16_777_216,
            mean: [0.5; 3],
            std: [0.5; 3],
        }
    }
}

impl VlmPreprocess {
    /// Reads preprocessor_config.json: pixel budget in `size.shortest_edge` /
    /// `size.longest_edge` (as pixel counts) or `min_pixels` / `max_pixels`.
    pub fn from_value(value: &Value) -> std::result::Result<Self, String> {
        let mut out = Self::default();
        let int = |v: Option<&Value>| v.and_then(Value::as_u64);
        if let Some(resample) = int(value.get("resample")) {
            if resample != 3 {
                return Err(format!(
                    "resample {resample} is not supported (3, bicubic, is)"
                ));
            }
        }
        for key in ["do_resize", "do_rescale", "do_normalize"] {
            if value.get(key).and_then(Value::as_bool) == Some(false) {
                return Err(format!("`{key}: false` is not supported"));
            }
        }
        let size = value.get("size");
        if let Some(n) =
            int(size.and_then(|s| s.get("shortest_edge"))).or(int(value.get("min_pixels")))
        {
            out.min_pixels = n;
        }
        if let Some(n) =
            int(size.and_then(|s| s.get("longest_edge"))).or(int(value.get("max_pixels")))
        {
            out.max_pixels = n;
        }
        for (key, field) in [
            ("patch_size", &mut out.patch_size),
            ("merge_size", &mut out.merge_size),
            ("temporal_patch_size", &mut out.temporal_patch_size),
        ] {
            if let Some(n) = int(value.get(key)) {
                *field = n as u32;
            }
        }
        for (key, field) in [("image_mean", &mut out.mean), ("image_std", &mut out.std)] {
            if let Some(v) = value.get(key) {
                let values: Vec<f32> =
                    serde_json::from_value(v.clone()).map_err(|e| format!("`{key}`: {e}"))?;
                *field = values
                    .try_into()
                    .map_err(|_| format!("`{key}` needs three values"))?;
            }
        }
        if out.patch_size == 0 || out.merge_size == 0 || out.min_pixels > out.max_pixels {
            return Err(
                "patch_size, merge_size and the pixel budget must be positive and ordered".into(),
            );
        }
        Ok(out)
    }

    /// `smart_resize`: both sides multiples of patch x merge, the area within the budget, the
    /// aspect ratio nearly kept. Rounds half to even, as Python's `round`.
    pub fn target_size(&self, height: u32, width: u32) -> std::result::Result<(u32, u32), String> {
        let factor = (self.patch_size * self.merge_size) as f64;
        let (h, w) = (height as f64, width as f64);
        if h.max(w) / h.min(w) > 200.0 {
            return Err(format!(
                "a {width}x{height} image is too elongated for the model (aspect ratio over 200)"
            ));
        }
        let mut hb = (h / factor).round_ties_even() * factor;
        let mut wb = (w / factor).round_ties_even() * factor;
        if hb * wb > self.max_pixels as f64 {
            let beta = (h * w / self.max_pixels as f64).sqrt();
            hb = factor.max((h / beta / factor).floor() * factor);
            wb = factor.max((w / beta / factor).floor() * factor);
        } else if hb * wb < self.min_pixels as f64 {
            let beta = (self.min_pixels as f64 / (h * w)).sqrt();
            hb = (h * beta / factor).ceil() * factor;
            wb = (w * beta / factor).ceil() * factor;
        }
        Ok((hb as u32, wb as u32))
    }

    /// The image as the processor's patch rows `[rows * cols, 3 * frames * patch^2]`, in
    /// merge-window order, with the grid in patches.
    pub fn patches(&self, image: &RgbImage, device: &Device) -> Result<(Tensor, usize, usize)> {
        let (w, h) = image.dimensions();
        if w == 0 || h == 0 {
            return Err(failed("empty image"));
        }
        let (rh, rw) = self.target_size(h, w).map_err(|m| failed(&m))?;
        let resized = if (rw, rh) == (w, h) {
            image.clone()
        } else {
            resize_rgb(image, rw, rh, Filter::Bicubic)
        };
        let p = self.patch_size as usize;
        let frames = self.temporal_patch_size as usize;
        let (rows, cols) = (rh as usize / p, rw as usize / p);
        let width = 3 * frames * p * p;
        let mut data = Vec::with_capacity(rows * cols * width);
        for (r, c) in patch_positions(rows, cols, self.merge_size as usize) {
            for ch in 0..3 {
                for _ in 0..frames {
                    for y in 0..p {
                        for x in 0..p {
                            let v = resized.get_pixel((c * p + x) as u32, (r * p + y) as u32)[ch];
                            // Rescaled in f64, normalised in f32, as the processor does.
                            let v = (v as f64 * (1.0 / 255.0)) as f32;
                            data.push((v - self.mean[ch]) / self.std[ch]);
                        }
                    }
                }
            }
        }
        let patches = Tensor::from_vec(data, (rows * cols, width), device)?;
        Ok((patches, rows, cols))
    }
}

/// The judge: model, tokenizer and processor of one Qwen3-VL folder.
pub struct VlmJudge {
    name: String,
    model: Qwen3VlModel,
    tokenizer: Tokenizer,
    preprocess: VlmPreprocess,
    /// Ids of the answers "1" and "2".
    answers: [u32; 2],
    device: Device,
}

impl VlmJudge {
    /// Loads config.json, the weights (one file or shards), tokenizer.json and
    /// preprocessor_config.json from `dir`, in `dtype` on `device`.
    pub fn load(name: String, dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let fail = |message: String| JudgeError::Load {
            judge: name.clone(),
            path: dir.to_path_buf(),
            message,
        };
        let read = |file: &str| -> Result<Value> {
            let text = icedit_flux::files::read_text_file(
                &dir.join(file),
                icedit_flux::files::MAX_CONFIG_BYTES,
            )
            .map_err(|e| fail(format!("cannot read {file}: {e}")))?;
            serde_json::from_str(&text).map_err(|e| fail(format!("{file}: {e}")))
        };
        let config = Qwen3VlConfig::from_value(&read("config.json")?).map_err(|m| {
            fail(format!(
                "config.json is not a Qwen3-VL config we can run: {m}"
            ))
        })?;
        let preprocess = if dir.join("preprocessor_config.json").is_file() {
            VlmPreprocess::from_value(&read("preprocessor_config.json")?)
                .map_err(|m| fail(format!("preprocessor_config.json: {m}")))?
        } else {
            VlmPreprocess::default()
        };
        let v = &config.vision;
        if (
            preprocess.patch_size,
            preprocess.merge_size,
            preprocess.temporal_patch_size,
        ) != (
            v.patch_size as u32,
            v.spatial_merge_size as u32,
            v.temporal_patch_size as u32,
        ) {
            return Err(fail(
                "the image processor's patch, merge or frame size differs from the model's".into(),
            ));
        }
        let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| fail(format!("tokenizer.json: {e}")))?;
        let answer = |digit: &str| {
            tokenizer
                .token_to_id(digit)
                .ok_or_else(|| fail(format!("the tokenizer has no single token for \"{digit}\"")))
        };
        let answers = [answer("1")?, answer("2")?];
        for (token, id) in [
            ("<|image_pad|>", config.image_token_id),
            ("<|vision_start|>", config.vision_start_token_id),
            ("<|vision_end|>", config.vision_end_token_id),
        ] {
            if tokenizer.token_to_id(token) != Some(id) {
                return Err(fail(format!(
                    "the tokenizer's {token} is not the config's token {id}"
                )));
            }
        }
        let files = weight_files(dir).map_err(fail)?;
        // SAFETY: the files are memory-mapped read-only and not modified while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }
            .map_err(|e| fail(format!("weights: {e}")))?;
        let model = Qwen3VlModel::load(&config, vb).map_err(|e| fail(format!("weights: {e}")))?;
        Ok(Self {
            name,
            model,
            tokenizer,
            preprocess,
            answers,
            device: device.clone(),
        })
    }

    pub fn model(&self) -> &Qwen3VlModel {
        &self.model
    }

    pub fn answer_ids(&self) -> [u32; 2] {
        self.answers
    }

    /// The chat-templated prompt for a comparison: one user turn with the three images
    /// (edited 1, edited 2, original), then the pairwise question; the assistant's turn
    /// opened.
    pub fn prompt(&self, comparison: &Comparison) -> Result<Prompt> {
        let merge = self.preprocess.merge_size as usize;
        let mut text = String::from("<|im_start|>user\n");
        let mut images = Vec::new();
        for image in [comparison.first, comparison.second, comparison.original] {
            let (patches, rows, cols) = self.preprocess.patches(image, &self.device)?;
            text.push_str("<|vision_start|>");
            text.push_str(&"<|image_pad|>".repeat(rows * cols / (merge * merge)));
            text.push_str("<|vision_end|>");
            images.push((patches, rows, cols));
        }
        text.push_str(&PAIRWISE_TEMPLATE.replace("{instruction}", comparison.instruction));
        text.push_str("<|im_end|>\n<|im_start|>assistant\n");
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| failed(&format!("tokenizing the prompt: {e}")))?;
        Ok(Prompt {
            input_ids: encoding.get_ids().to_vec(),
            images,
        })
    }
}

impl Judge for VlmJudge {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn compare(&mut self, comparison: &Comparison) -> Result<Verdict> {
        let start = Instant::now();
        let prompt = self.prompt(comparison)?;
        let (logits, _) = self.model.next_token_logits(&prompt)?;
        let logits: Vec<f32> = logits.to_vec1()?;
        let [one, two] = self.answers.map(|id| logits[id as usize] as f64);
        // Probability of "2" between the two answers.
        let p_second = 1.0 / (1.0 + (one - two).exp());
        Ok(Verdict {
            preference: if two > one {
                Preference::Second
            } else {
                Preference::First
            },
            judge: self.name(),
            answer: format!("P(1) = {:.3}, P(2) = {p_second:.3}", 1.0 - p_second),
            latency: start.elapsed(),
            warnings: Vec::new(),
        })
    }
}

fn failed(message: &str) -> JudgeError {
    JudgeError::Failed {
        judge: "qwen3-vl".into(),
        message: message.to_string(),
    }
}

/// The files of a Qwen3-VL folder: required ones first, then those used when present.
pub(crate) const VLM_FILES: (&[&str], &[&str]) = (
    &["config.json", "tokenizer.json"],
    &[
        "preprocessor_config.json",
        "model.safetensors",
        "model.safetensors.index.json",
    ],
);
