//! The FLUX.1 Fill pipeline: image + mask + prompt -> image, as diffusers' `FluxFillPipeline`
//! computes it, with inpainting and outpainting ([`canvas::expand`]) as first-class jobs.

pub mod canvas;
pub mod edit;
mod error;
pub mod image_io;
pub mod kontext;
pub mod latents;
pub mod masked;
pub mod memory;
pub mod pipeline;
pub mod recipe;
pub mod scheduler;
pub mod search;
pub mod torch_rng;

pub use edit::{Diptych, EditJob, EditOutput, EditSettings, EditText};
pub use error::{PipelineError, Result};
pub use kontext::{KontextJob, KontextOptions};
pub use masked::{ContextMargin, MaskedEdit, Window};
pub use memory::{MemoryOptions, MemoryPlan, Offload};
pub use pipeline::{
    Denoising, FillOutput, FillRequest, FluxPipeline, InitialNoise, PipelineKind, Progress,
};
