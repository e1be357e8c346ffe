//! The FLUX.1 Fill pipeline: image + mask + prompt -> image.

pub mod torch_rng;
