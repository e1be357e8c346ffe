//! Errors of the text crate: each names the file (and tensor) at fault and says what to check.

use std::path::{Path, PathBuf};

pub type Result<T, E = TextError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// A file the component needs is not there.
    #[error("{what} not found: {} ({hint})", path.display())]
    MissingFile {
        what: &'static str,
        path: PathBuf,
        hint: String,
    },

    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{} is not valid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// The config parses but describes something this crate cannot run.
    #[error("unsupported config in {}: {message}", path.display())]
    Config { path: PathBuf, message: String },

    /// The tokenizer files parse as JSON but the tokenizers library rejects them.
    #[error("cannot build the {which} tokenizer from {}: {message}", path.display())]
    Tokenizer {
        which: &'static str,
        path: PathBuf,
        message: String,
    },

    #[error("the {which} tokenizer failed on the prompt: {message}")]
    Tokenize {
        which: &'static str,
        message: String,
    },

    #[error(
        "tensor `{name}` is missing from {} (incomplete download, or not a {model} checkpoint?)",
        files_list(files)
    )]
    MissingTensor {
        name: String,
        model: &'static str,
        files: Vec<PathBuf>,
    },

    #[error("tensor `{name}` in {} has shape {found:?}, but its config.json implies {expected:?} (config and weights from different models?)", file.display())]
    TensorShape {
        name: String,
        file: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    /// Reading the safetensors files themselves failed (I/O, corrupt header, unsupported dtype).
    #[error(transparent)]
    Weights(#[from] icedit_flux::FluxError),

    /// An encoder's output holds NaN or infinite values (an overflow, in half precision).
    #[error(
        "the {encoder} overflowed on this prompt: NaN or infinite values in {}; {}",
        dtype.as_str(),
        match dtype {
            candle_core::DType::F16 => "run with `--dtype bf16` (same memory, a wider range) or \
                                        `--dtype f32`",
            candle_core::DType::BF16 => "run with `--dtype f32`",
            _ => "check the text encoder's weights",
        }
    )]
    NonFiniteOutput {
        encoder: &'static str,
        dtype: candle_core::DType,
    },

    #[error("bad input: {0}")]
    Input(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

fn files_list(files: &[PathBuf]) -> String {
    match files {
        [] => "the checkpoint".to_string(),
        [one] => one.display().to_string(),
        many => format!(
            "{} and {} more files of the same checkpoint",
            many[0].display(),
            many.len() - 1
        ),
    }
}

/// Reads a file, naming it in the error.
pub(crate) fn read_to_string(path: &Path) -> Result<String> {
    icedit_flux::files::read_text_file(path, icedit_flux::files::MAX_CONFIG_BYTES).map_err(
        |source| TextError::Io {
            path: path.to_path_buf(),
            source,
        },
    )
}

/// Reads and parses a JSON file, naming it in the error.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = read_to_string(path)?;
    serde_json::from_str(&text).map_err(|source| TextError::Json {
        path: path.to_path_buf(),
        source,
    })
}
