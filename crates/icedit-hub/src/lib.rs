//! Model sources: Hugging Face Hub repos and local folders.
//!
//! ```no_run
//! use icedit_hub::{HubOptions, ModelRepo};
//!
//! let repo = ModelRepo::open("black-forest-labs/FLUX.1-Fill-dev", &HubOptions::from_env())?;
//! let config = repo.file("transformer/config.json")?;
//! let weights = repo.safetensors_set("transformer", "diffusion_pytorch_model")?;
//! # Ok::<(), icedit_hub::HubError>(())
//! ```
//!
//! Hub files come from the standard Hugging Face cache (shared with Python's
//! `huggingface_hub`) and are downloaded into it when missing, unless offline.

mod cache;
mod error;
mod listing;
mod options;
mod remote;
mod repo;
mod source;

pub use cache::import_folder;
pub use error::{HubError, MissingFiles, MissingReason, Result, UntrustedResponse};
pub use options::{HubOptions, DEFAULT_ENDPOINT};
pub use repo::{FileSpec, ModelRepo};
pub use source::{ModelSource, DEFAULT_REVISION};
