//! The FLUX.1 Fill pipeline: image + mask + prompt -> image, as diffusers' `FluxFillPipeline`
//! computes it, with inpainting and outpainting ([`canvas::expand`]) as first-class jobs.

pub mod canvas;
pub mod edit;
mod error;
pub mod fill;
pub mod image_io;
pub mod latents;
pub mod recipe;
pub mod scheduler;
pub mod search;
pub mod torch_rng;

pub use edit::{Diptych, EditOutput, EditSettings};
pub use error::{PipelineError, Result};
pub use fill::{Denoising, FillOutput, FillPipeline, FillRequest, InitialNoise, Progress};
