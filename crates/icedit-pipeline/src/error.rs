use std::path::PathBuf;

/// Errors of the pipeline. Model-loading errors keep their source's message (which names the
/// file and tensor); input errors say what was wrong and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid config: {message}")]
    Config { path: PathBuf, message: String },
    #[error("cannot read image {path}: {message}")]
    Image { path: PathBuf, message: String },
    #[error("{0}")]
    Input(String),
    #[error("cannot write {path}: {message}")]
    Output { path: PathBuf, message: String },
    #[error(transparent)]
    Flux(#[from] icedit_flux::FluxError),
    #[error(transparent)]
    Text(#[from] icedit_text::TextError),
    #[error(transparent)]
    Hub(#[from] icedit_hub::HubError),
    #[error(transparent)]
    Adapter(#[from] icedit_adapters::AdapterError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A run asked to stop (a cancel, a time limit) before its end.
    #[error("stopped: {0}")]
    Stopped(&'static str),
}

pub type Result<T> = std::result::Result<T, PipelineError>;
