//! LoRA and mixture-of-LoRA-experts adapters for the FLUX transformer.
//!
//! Files in PEFT/diffusers naming (`transformer.<module>.lora_A.weight`), BFL or kohya naming
//! (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, fused layers split), and ICEdit's
//! MoE-LoRA format (`lora_A.expert_{k}`, `lora_route`) are read into one form, matched to the
//! transformer's linear layers (every key must match, every shape must fit), and then merged into
//! the weights or hooked in at run time through [`icedit_flux::Linear::attach`].
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let mut model: icedit_flux::FluxTransformer = todo!();
//! use icedit_adapters::{apply_adapters, resolve, AdapterChoice, AdapterFile, ApplyMode};
//! let adapter = resolve("icedit-moe", &icedit_hub::HubOptions::from_env())?;
//! let choice = AdapterChoice {
//!     name: adapter.name.clone(),
//!     file: AdapterFile::read(&adapter.path)?,
//!     scale: adapter.default_scale(),
//!     top_k: None,
//! };
//! let applied = apply_adapters(&mut model, vec![choice], ApplyMode::Merge)?;
//! # Ok(()) }
//! ```

mod apply;
mod error;
mod file;
mod layers;
mod source;

pub use apply::{apply_adapters, lora_deltas, AdapterChoice, AppliedAdapter, ApplyMode};
pub use error::{AdapterError, Result};
pub use file::AdapterFile;
pub use layers::{LoraDelta, MoeLoraLayer, RoutingStats};
pub use source::{
    manifest_of, resolve, AdapterKind, AdapterSpec, Manifest, ResolvedAdapter, DEFAULT_ADAPTER,
    TURBO_ADAPTER,
};
