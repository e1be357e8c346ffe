//! FLUX.1 diffusion transformer (dev and Fill) on candle, loading diffusers and BFL checkpoints,
//! computing what diffusers' `FluxTransformer2DModel` computes.
//!
//! ```no_run
//! # fn main() -> icedit_flux::Result<()> {
//! use icedit_flux::{Checkpoint, FluxTransformer};
//! let checkpoint = Checkpoint::open("FLUX.1-Fill-dev".as_ref())?;
//! let model = FluxTransformer::load(&checkpoint, candle_core::DType::BF16, &candle_core::Device::Cpu)?;
//! # Ok(()) }
//! ```

mod attention;
pub mod compare;
mod config;
mod cpu_kernels;
#[cfg(feature = "cuda")]
mod cuda_gemm;
mod error;
pub mod files;
mod finite;
pub mod gguf;
mod linear;
mod model;
pub mod norms;
pub mod quantize;
pub mod step_cache;
mod vae;
mod weights;

pub use attention::{attention, chunked_attention, flash_attention};
pub use config::{FluxConfig, MLP_RATIO, ROPE_THETA};
pub use cpu_kernels::{cpu_fast_paths, matmul_selected_rows};
pub use error::{FluxError, Result};
pub use finite::{all_finite, check_finite};
pub use linear::{Linear, LinearAdapter, VisitLinears};
pub use model::{FluxInput, FluxTransformer, ParameterCounts};
pub use step_cache::{round_to, StepCache, StepCacheConfig};
pub use vae::{AutoencoderKl, Posterior, VaeConfig};
pub use weights::{
    bfl_linear, check_model_dtype, parse_dtype, shape_fits, BflPart, Checkpoint, Layout,
    MappedTensors, SafetensorsSet, Sharding, Stored, TensorFiles, WeightSource,
};
