use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, AdapterError>;

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("cannot read the adapter file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error(
        "{path} is not a readable safetensors file ({reason}); if it was downloaded, it may be \
         truncated or corrupt: delete it and fetch it again"
    )]
    Corrupt { path: PathBuf, reason: String },

    #[error(
        "{path}: {} tensor(s) match no layer of this FLUX transformer (an adapter for another \
         model, or a naming this tool does not know):\n{}",
        keys.len(),
        list(keys)
    )]
    UnmatchedKeys { path: PathBuf, keys: Vec<String> },

    #[error(
        "{path}: {} tensor(s) do not fit the model's layers; the adapter was made for another \
         base model (FLUX.1 Fill has 384 input channels, FLUX.1 dev 64):\n{}",
        problems.len(),
        list(problems)
    )]
    ShapeMismatch {
        path: PathBuf,
        problems: Vec<String>,
    },

    #[error(
        "{path}: {} tensor(s) hold NaN or infinite values, so every image would come out \
         black; the adapter file is corrupt (or was saved from a diverged training run): \
         download or export it again:\n{}",
        keys.len(),
        list(keys)
    )]
    NonFiniteTensors { path: PathBuf, keys: Vec<String> },

    #[error(
        "adapter `{adapter}` on layer `{layer}` (scale {}) gives NaN or infinite {what} in {}: \
         {}",
        short_number(*scale),
        dtype.as_str(),
        overflow_advice(*dtype)
    )]
    NonFiniteLayer {
        adapter: String,
        layer: String,
        /// "merged weights", "weights".
        what: &'static str,
        scale: f64,
        dtype: candle_core::DType,
    },

    #[error("{path}: {}", problems.join("; "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },

    #[error(
        "unknown adapter `{name}`: it is not a known adapter name ({known}), an existing file or \
         folder, or an `hf:OWNER/REPO[/FILE]` Hub reference"
    )]
    UnknownAdapter { name: String, known: String },

    #[error("adapter manifest {path}: {message}")]
    Manifest { path: String, message: String },

    #[error("the adapter repo {repo} {message}")]
    RepoListing { repo: String, message: String },

    #[error(transparent)]
    Hub(#[from] icedit_hub::HubError),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `0.75`, `2e39`: plain unless very large or small.
fn short_number(x: f64) -> String {
    if x != 0.0 && !(1e-4..1e6).contains(&x.abs()) {
        format!("{x:e}")
    } else {
        x.to_string()
    }
}

fn overflow_advice(dtype: candle_core::DType) -> &'static str {
    match dtype {
        candle_core::DType::F16 => {
            "the scale is too large for float16; lower the adapter's scale (--lora-scale) or \
             run with `--dtype bf16` or `--dtype f32`"
        }
        _ => "the scale is far too large; lower the adapter's scale (--lora-scale)",
    }
}

/// A bulleted list, cut after 20 entries.
fn list(items: &[String]) -> String {
    const SHOWN: usize = 20;
    let mut out: Vec<String> = items
        .iter()
        .take(SHOWN)
        .map(|k| format!("  - {k}"))
        .collect();
    if items.len() > SHOWN {
        out.push(format!("  ... and {} more", items.len() - SHOWN));
    }
    out.join("\n")
}
