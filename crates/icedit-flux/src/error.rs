//! Errors of the FLUX crate: each says what was wrong and, where it can, how to fix it.

use std::path::PathBuf;

use candle_core::DType;

pub type Result<T, E = FluxError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum FluxError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path} is not a valid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },

    #[error("{path} is not a valid GGUF file: {message}")]
    Gguf { path: PathBuf, message: String },

    #[error("invalid transformer config{}: {message}", path.as_ref().map(|p| format!(" in {}", p.display())).unwrap_or_default())]
    Config {
        path: Option<PathBuf>,
        message: String,
    },

    #[error("invalid VAE config{}: {message}", path.as_ref().map(|p| format!(" in {}", p.display())).unwrap_or_default())]
    VaeConfig {
        path: Option<PathBuf>,
        message: String,
    },

    /// `name` is the checkpoint's name; `read_as` the model's (diffusers) name when they differ.
    #[error(
        "tensor `{name}`{} is missing from the checkpoint{}",
        read_as_hint(read_as),
        files_hint(files)
    )]
    MissingTensor {
        name: String,
        read_as: Option<String>,
        files: Vec<PathBuf>,
    },

    #[error("tensor `{name}`{} has shape {found:?} but the model config expects {expected:?} (is this checkpoint for another model or config?)", read_as_hint(read_as))]
    ShapeMismatch {
        name: String,
        read_as: Option<String>,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("tensor `{name}` is stored as {dtype}, which this loader cannot read (supported: F32, F16, BF16, F64, F8_E4M3, and GGUF blocks)")]
    UnsupportedTensorDtype { name: String, dtype: String },

    /// A weight holds NaN or infinite values once read in the model's dtype: stored so (a
    /// corrupt or diverged checkpoint), or too large for the dtype it was converted to.
    #[error(
        "tensor `{name}` in {} holds NaN or infinite values{}",
        file.display(),
        non_finite_weight_hint(*stored, *dtype, *in_file)
    )]
    NonFiniteWeight {
        name: String,
        file: PathBuf,
        /// The dtype in the file.
        stored: DType,
        /// The dtype it was read as.
        dtype: DType,
        /// Whether the file itself holds them (else the conversion to `dtype` overflowed).
        in_file: bool,
    },

    /// A computation (a denoising step, the VAE, a text encoder) gave NaN or infinite values.
    #[error("{}", non_finite_values_message(stage, *dtype))]
    NonFiniteValues { stage: String, dtype: DType },

    #[error("cannot run the model in {requested}: choose one of f32, bf16, f16")]
    UnsupportedDtype { requested: String },

    #[error("bad model input: {0}")]
    Input(String),

    /// A model folder without its weights, or a shard its index names but the folder lacks.
    #[error("no {what} at {}: {hint}", path.display())]
    MissingWeights {
        /// `model weights` or `weight shard`.
        what: &'static str,
        path: PathBuf,
        hint: String,
    },

    #[error(transparent)]
    Candle(candle_core::Error),
}

fn read_as_hint(read_as: &Option<String>) -> String {
    read_as
        .as_ref()
        .map(|n| format!(" (read as `{n}`)"))
        .unwrap_or_default()
}

fn non_finite_weight_hint(stored: DType, dtype: DType, in_file: bool) -> String {
    if in_file {
        " in the file: the checkpoint is corrupt (or was saved from a diverged model); download \
         it again or use another copy"
            .to_string()
    } else {
        format!(
            " once converted from {} to {} (out of its range): run with `--dtype f32`{}",
            stored.as_str(),
            dtype.as_str(),
            if dtype == DType::F16 {
                " or `--dtype bf16`"
            } else {
                ""
            }
        )
    }
}

fn non_finite_values_message(stage: &str, dtype: DType) -> String {
    let advice = crate::finite::dtype_advice(dtype);
    match dtype {
        DType::F16 | DType::BF16 => format!(
            "the model overflowed {stage}: NaN or infinite values in {}; {advice}",
            dtype.as_str()
        ),
        _ => format!("the model produced NaN or infinite values {stage}; {advice}"),
    }
}

fn files_hint(files: &[PathBuf]) -> String {
    match files {
        [] => String::new(),
        [one] => format!(" ({})", one.display()),
        many => format!(" ({} and {} more files)", many[0].display(), many.len() - 1),
    }
}

impl FluxError {
    /// Carries this error through candle's `VarBuilder` (whose backends must return candle errors);
    /// `From<candle_core::Error>` takes it back out unchanged.
    pub(crate) fn into_candle(self) -> candle_core::Error {
        candle_core::Error::WrappedContext {
            wrapped: Box::new(self),
            context: String::new(),
        }
    }
}

impl From<candle_core::Error> for FluxError {
    fn from(err: candle_core::Error) -> Self {
        match err {
            candle_core::Error::WrappedContext { wrapped, context } => {
                match wrapped.downcast::<FluxError>() {
                    Ok(flux) => *flux,
                    Err(wrapped) => {
                        FluxError::Candle(candle_core::Error::WrappedContext { wrapped, context })
                    }
                }
            }
            candle_core::Error::WithBacktrace { inner, .. } => FluxError::from(*inner),
            other => FluxError::Candle(other),
        }
    }
}
