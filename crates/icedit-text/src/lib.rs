//! Text conditioning for FLUX: CLIP-L pooled output and T5 encoder states, computing what
//! diffusers' `FluxFillPipeline.encode_prompt` computes (diffusers 0.42.1, transformers 5.23).
//!
//! ```no_run
//! # fn main() -> icedit_text::Result<()> {
//! use candle_core::{DType, Device};
//! use icedit_text::TextEncoders;
//!
//! let encoders = TextEncoders::load("FLUX.1-Fill-dev".as_ref(), None, DType::BF16, &Device::Cpu)?;
//! let text = encoders.encode("make it night", 512)?;
//! for warning in text.truncation_warnings() {
//!     eprintln!("warning: {warning}");
//! }
//! drop(encoders); // T5-XXL is 9 GB in bf16: free it before the transformer loads
//! # Ok(()) }
//! ```
//!
//! Files read from the pipeline folder:
//! - `tokenizer/`: `vocab.json` + `merges.txt`, or `tokenizer.json`; optional
//!   `tokenizer_config.json`, `special_tokens_map.json`.
//! - `tokenizer_2/`: `tokenizer.json`; optional `tokenizer_config.json`,
//!   `special_tokens_map.json`.
//! - `text_encoder/`, `text_encoder_2/`: `config.json` and `model.safetensors`, or
//!   `model.safetensors.index.json` with its shards.

mod clip;
mod error;
mod layers;
mod t5;
mod tokenizer;
mod weights;

use std::path::Path;

use candle_core::{DType, Device, Tensor};

pub use clip::{ClipModel, ClipTextConfig, ClipTextEncoder, ClipVisionConfig, ClipVisionEncoder};
pub use error::{Result, TextError};
pub use layers::Activation;
pub use t5::{T5Config, T5Encoder};
pub use tokenizer::{Encoded, PromptTokenizer, TokenizerKind};

/// The longest T5 sequence diffusers' FLUX pipelines accept.
pub const MAX_SEQUENCE_LENGTH: usize = 512;

/// What the FLUX transformer is conditioned on for one prompt.
#[derive(Debug, Clone)]
pub struct TextConditioning {
    /// T5 last hidden state `[1, max_sequence_length, d_model]` (diffusers' `prompt_embeds`).
    pub t5: Tensor,
    /// CLIP pooled output `[1, hidden]` (diffusers' `pooled_prompt_embeds`).
    pub pooled: Tensor,
    pub clip_tokens: Encoded,
    pub t5_tokens: Encoded,
}

impl TextConditioning {
    /// One line per tokenizer that had to cut the prompt.
    pub fn truncation_warnings(&self) -> Vec<String> {
        [&self.clip_tokens, &self.t5_tokens]
            .into_iter()
            .filter_map(Encoded::truncation_warning)
            .collect()
    }
}

/// Both tokenizers and both encoders of a FLUX pipeline. Drop it once the prompt is encoded
/// to free their memory.
pub struct TextEncoders {
    pub clip_tokenizer: PromptTokenizer,
    pub t5_tokenizer: PromptTokenizer,
    pub clip: ClipTextEncoder,
    pub t5: T5Encoder,
}

impl TextEncoders {
    /// Loads `tokenizer/`, `tokenizer_2/`, `text_encoder/` and `text_encoder_2/` of a diffusers
    /// FLUX pipeline folder, the encoders in `dtype` on `device`; T5's weights from `t5_file`
    /// when given (see [`T5Encoder::load_file`]).
    pub fn load(
        pipeline_dir: &Path,
        t5_file: Option<&Path>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let t5_dir = pipeline_dir.join("text_encoder_2");
        Ok(Self {
            clip_tokenizer: PromptTokenizer::clip(&pipeline_dir.join("tokenizer"))?,
            t5_tokenizer: PromptTokenizer::t5(&pipeline_dir.join("tokenizer_2"))?,
            clip: ClipTextEncoder::load(&pipeline_dir.join("text_encoder"), dtype, device)?,
            t5: match t5_file {
                Some(file) => {
                    T5Encoder::load_file(&t5_dir.join("config.json"), file, dtype, device)?
                }
                None => T5Encoder::load(&t5_dir, dtype, device)?,
            },
        })
    }

    /// diffusers' `encode_prompt(prompt, prompt_2=None, max_sequence_length=...)`: CLIP sees
    /// the prompt padded to its `model_max_length` (77), T5 padded to `max_sequence_length`.
    pub fn encode(&self, prompt: &str, max_sequence_length: usize) -> Result<TextConditioning> {
        if max_sequence_length > MAX_SEQUENCE_LENGTH {
            return Err(TextError::Input(format!(
                "max_sequence_length cannot be greater than {MAX_SEQUENCE_LENGTH}, got {max_sequence_length}"
            )));
        }
        let clip_tokens = self
            .clip_tokenizer
            .encode(prompt, self.clip_tokenizer.model_max_length())?;
        let t5_tokens = self.t5_tokenizer.encode(prompt, max_sequence_length)?;
        let pooled = self
            .clip
            .pooled_output(&clip_tokens.to_tensor(self.clip.device())?)?;
        let t5 = self.t5.forward(&t5_tokens.to_tensor(self.t5.device())?)?;
        // One pass each: T5 in float16 is known to overflow, and NaN states give black images.
        for (encoder, out) in [("CLIP text encoder", &pooled), ("T5 text encoder", &t5)] {
            if !icedit_flux::all_finite(out)? {
                return Err(TextError::NonFiniteOutput {
                    encoder,
                    dtype: out.dtype(),
                });
            }
        }
        Ok(TextConditioning {
            t5,
            pooled,
            clip_tokens,
            t5_tokens,
        })
    }
}
