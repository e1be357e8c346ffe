//! Parity with diffusers' FluxTransformer2DModel on the committed fixtures
//! (tests/reference/gen_flux_transformer.py), in both checkpoint layouts and three dtypes.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use icedit_flux::{Checkpoint, FluxConfig, FluxInput, FluxTransformer, Layout};

const CONFIGS: [&str; 3] = ["fill_diptych", "dev_sharded", "noguidance_wide"];
const F32_TOLERANCE: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    icedit_test_support::fixture("flux").join(name)
}

struct Reference {
    io: HashMap<String, Tensor>,
    meta: serde_json::Value,
}

impl Reference {
    fn load(name: &str) -> Reference {
        let dir = fixture(name);
        let io = candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu).unwrap();
        let meta =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
                .unwrap();
        Reference { io, meta }
    }

    fn input(&self) -> FluxInput<'_> {
        FluxInput::from_named(&self.io).unwrap()
    }

    fn reference_error(&self, dtype: &str) -> f32 {
        self.meta["reference_max_abs_err_vs_f32"][dtype]
            .as_f64()
            .unwrap() as f32
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    icedit_flux::compare::max_abs_diff(a, b).unwrap()
}

fn diffusers_config(name: &str) -> FluxConfig {
    FluxConfig::from_json_file(&fixture(name).join("transformer/config.json")).unwrap()
}

/// Both layouts: the diffusers folder, and the BFL file (whose small head size needs the config).
fn checkpoints(name: &str) -> Vec<Checkpoint> {
    vec![
        Checkpoint::open(&fixture(name)).unwrap(),
        Checkpoint::open_with_config(
            &fixture(name).join("flux1-bfl.safetensors"),
            diffusers_config(name),
        )
        .unwrap(),
    ]
}

fn run(checkpoint: &Checkpoint, dtype: DType, reference: &Reference) -> Tensor {
    let model = FluxTransformer::load(checkpoint, dtype, &Device::Cpu).unwrap();
    model.forward(&reference.input()).unwrap()
}

#[test]
fn f32_matches_diffusers_in_both_layouts() {
    for name in CONFIGS {
        let reference = Reference::load(name);
        for checkpoint in checkpoints(name) {
            let out = run(&checkpoint, DType::F32, &reference);
            let err = max_abs_diff(&out, &reference.io["out_f32"]);
            println!("{name} {:?} f32 max abs err {err:.2e}", checkpoint.layout());
            assert!(
                err <= F32_TOLERANCE,
                "{name} ({:?} layout): max abs error {err} > {F32_TOLERANCE}",
                checkpoint.layout()
            );
            assert!(
                checkpoint.unused_tensors().is_empty(),
                "{name}: unused {:?}",
                checkpoint.unused_tensors()
            );
        }
    }
}

fn rms_diff(a: &Tensor, b: &Tensor) -> f32 {
    icedit_flux::compare::rms_diff(a, b).unwrap()
}

/// Our half-precision error against diffusers' f32 output must be no worse than diffusers' own
/// half-precision error. Both are rounding noise: the RMS error shows a systematic loss (allowed
/// 5% for sampling noise), while the max over a few thousand values moves by whole output ulps
/// from one rounding to the next, so it gets half an ulp at the output's magnitude.
#[test]
fn half_precision_no_worse_than_the_reference_own_error() {
    for name in CONFIGS {
        let reference = Reference::load(name);
        let f32_out = &reference.io["out_f32"];
        let out_max = reference.meta["out_max_abs"].as_f64().unwrap() as f32;
        for checkpoint in checkpoints(name) {
            for (dtype, label, mantissa_bits) in [(DType::BF16, "bf16", 7), (DType::F16, "f16", 10)]
            {
                let out = run(&checkpoint, dtype, &reference);
                assert_eq!(out.dtype(), dtype);
                let theirs_out = &reference.io[&format!("out_{label}")];
                let (ours_max, theirs_max) = (
                    max_abs_diff(&out, f32_out),
                    reference.reference_error(label),
                );
                let (ours_rms, theirs_rms) =
                    (rms_diff(&out, f32_out), rms_diff(theirs_out, f32_out));
                let half_ulp = 2f32.powi(out_max.log2().floor() as i32 - mantissa_bits) / 2.0;
                println!(
                    "{name} {:?} {label}: error vs f32 max {ours_max:.3e} (diffusers {theirs_max:.3e}), \
                     rms {ours_rms:.3e} (diffusers {theirs_rms:.3e})",
                    checkpoint.layout()
                );
                assert!(
                    ours_rms <= theirs_rms * 1.05 && ours_max <= theirs_max + half_ulp,
                    "{name} {label} ({:?}): error vs f32 (max {ours_max}, rms {ours_rms}) is worse \
                     than diffusers' own (max {theirs_max}, rms {theirs_rms})",
                    checkpoint.layout()
                );
            }
        }
    }
}

#[test]
fn layouts_are_detected_and_configs_agree() {
    let dir = Checkpoint::open(&fixture("dev_sharded")).unwrap();
    assert_eq!(dir.layout(), Layout::Diffusers);
    assert_eq!(dir.files().paths().len(), 4, "sharded fixture has 4 shards");
    assert_eq!(
        dir.config().out_channels(),
        64,
        "dev: out_channels defaults to in_channels"
    );

    // The transformer folder itself opens too, not only the pipeline folder above it.
    let sub = Checkpoint::open(&fixture("fill_diptych").join("transformer")).unwrap();
    assert_eq!(sub.config(), &diffusers_config("fill_diptych"));
    assert_eq!(sub.config().in_channels, 384);

    // ComfyUI-style prefix is stripped.
    let prefixed = Checkpoint::open_with_config(
        &fixture("noguidance_wide").join("flux1-bfl.safetensors"),
        diffusers_config("noguidance_wide"),
    )
    .unwrap();
    assert_eq!(prefixed.layout(), Layout::Bfl);
}

#[test]
fn every_linear_is_visited_with_its_diffusers_name_and_runs_through_the_hook() {
    use icedit_flux::LinearAdapter;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Adds a constant to the layer output and counts its calls.
    #[derive(Debug)]
    struct Constant {
        calls: AtomicUsize,
        value: f32,
        out_features: usize,
    }
    impl LinearAdapter for Constant {
        fn forward_delta(&self, x: &Tensor) -> candle_core::Result<Tensor> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let mut dims = x.dims().to_vec();
            *dims.last_mut().unwrap() = self.out_features;
            Tensor::full(self.value, dims, x.device())?.to_dtype(x.dtype())
        }
    }

    let reference = Reference::load("fill_diptych");
    let checkpoint = Checkpoint::open(&fixture("fill_diptych")).unwrap();
    let mut model = FluxTransformer::load(&checkpoint, DType::F32, &Device::Cpu).unwrap();

    let mut adapters = Vec::new();
    model.visit_linears(&mut |name, linear| {
        // Zero everywhere but the last projection, which adds exactly 1 to every output.
        let adapter = Arc::new(Constant {
            calls: AtomicUsize::new(0),
            value: if name == "proj_out" { 1.0 } else { 0.0 },
            out_features: linear.out_features(),
        });
        linear.attach(adapter.clone()).unwrap();
        adapters.push((name.to_string(), adapter));
    });
    // 2 double blocks x 14, 4 single blocks x 6, x/context embedders, 3 MLP embedders x 2,
    // norm_out and proj_out.
    assert_eq!(adapters.len(), 2 * 14 + 4 * 6 + 2 + 3 * 2 + 2);
    for expected in [
        "x_embedder",
        "context_embedder",
        "time_text_embed.guidance_embedder.linear_2",
        "transformer_blocks.1.attn.add_k_proj",
        "transformer_blocks.0.attn.to_out.0",
        "transformer_blocks.0.ff_context.net.0.proj",
        "single_transformer_blocks.3.proj_mlp",
        "single_transformer_blocks.0.norm.linear",
        "norm_out.linear",
    ] {
        assert!(
            adapters.iter().any(|(n, _)| n == expected),
            "missing {expected}"
        );
    }

    let out = model.forward(&reference.input()).unwrap();
    for (name, adapter) in &adapters {
        assert_eq!(
            adapter.calls.load(Ordering::SeqCst),
            1,
            "{name} did not run through its hook"
        );
    }
    let shifted = (&reference.io["out_f32"] + 1.0).unwrap();
    assert!(max_abs_diff(&out, &shifted) <= F32_TOLERANCE);
}
