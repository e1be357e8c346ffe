//! Where the weights live (offload), whether a dense transformer is quantized as it loads, and
//! the plan `--max-memory` makes of both: predicted before loading, measured after.

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use icedit_flux::{FluxConfig, ParameterCounts};

/// Where the transformer's weights live while a run computes on a GPU. On the CPU, host memory
/// is the device's: every choice computes alike there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Offload {
    /// Every part on the device for as long as the pipeline lives.
    #[default]
    None,
    /// The transformer on the device while it denoises and in host memory while the VAE works;
    /// the VAE on the device only to encode and decode.
    Model,
    /// The transformer's blocks in host memory, each copied to the device when its turn comes
    /// (the next while the current one computes); the VAE as with `Model`.
    Blocks,
}

impl Offload {
    pub fn name(self) -> &'static str {
        match self {
            Offload::None => "none",
            Offload::Model => "model",
            Offload::Blocks => "blocks",
        }
    }
}

/// What the pipeline does with its weights' memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryOptions {
    pub offload: Offload,
    /// A dense transformer quantized to this type as it loads (as `icedit quantize` would
    /// write it); a GGUF one stays as stored.
    pub quantize: Option<GgmlDType>,
}

/// What a plan is made from: the models' shapes (from their config files, before any weights
/// are read) and the run's size.
#[derive(Debug, Clone)]
pub struct PlanInputs {
    pub transformer: FluxConfig,
    /// Its linear layers' parameters ([`FluxTransformer::parameters`]).
    pub transformer_parameters: ParameterCounts,
    /// Bytes of a transformer stored quantized (a GGUF file), whose size is then fixed.
    pub transformer_file_bytes: Option<u64>,
    /// Parameters of the text encoders (T5 and CLIP) and the VAE.
    pub text_encoder_parameters: u64,
    /// Bytes of a T5 file used in place of the model's (a GGUF file), else `None`.
    pub text_encoder_2_file_bytes: Option<u64>,
    pub vae_parameters: u64,
    /// Tokens the transformer sees at once: image (noise and, for Kontext, the photo) and text.
    pub image_tokens: u64,
    pub text_tokens: u64,
    /// Pixels of the largest image the VAE encodes or decodes.
    pub pixels: u64,
    pub dtype: DType,
    pub device_is_cpu: bool,
    /// The text encoders stay on the device between prompts (a server), beside the transformer.
    pub text_encoders_kept: bool,
}

/// One phase of a run and the memory it holds on the device at its peak.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlannedPhase {
    pub phase: &'static str,
    pub weights_bytes: u64,
    pub work_bytes: u64,
}

/// The choice `--max-memory` made, with the peak it predicts.
#[derive(Debug, Clone)]
pub struct MemoryPlan {
    pub options: MemoryOptions,
    pub dtype: DType,
    pub budget_bytes: u64,
    pub phases: Vec<PlannedPhase>,
}

impl MemoryPlan {
    pub fn predicted_peak(&self) -> u64 {
        self.phases
            .iter()
            .map(|p| p.weights_bytes + p.work_bytes)
            .max()
            .unwrap_or(0)
    }

    /// The plan as printed before loading.
    pub fn describe(&self) -> String {
        let mut text = format!(
            "memory plan for {}: transformer {}{}, offload {}; predicted peak {}",
            gib(self.budget_bytes),
            format!("{:?}", self.dtype).to_lowercase(),
            match self.options.quantize {
                Some(t) => format!(" quantized to {t:?} at load"),
                None => String::new(),
            },
            self.options.offload.name(),
            gib(self.predicted_peak()),
        );
        for p in &self.phases {
            text.push_str(&format!(
                "\n  {:<12} {} weights + {} working memory",
                p.phase,
                gib(p.weights_bytes),
                gib(p.work_bytes)
            ));
        }
        text
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "budget_bytes": self.budget_bytes,
            "dtype": format!("{:?}", self.dtype).to_lowercase(),
            "quantize": self.options.quantize.map(|t| format!("{t:?}")),
            "offload": self.options.offload.name(),
            "predicted_peak_bytes": self.predicted_peak(),
            "phases": self.phases,
        })
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// A size as users write it: `24G`, `24GB`, `24GiB`, `12000M`, `8g` (powers of 1024).
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim().to_ascii_lowercase();
    let t = t
        .strip_suffix("ib")
        .or_else(|| t.strip_suffix('b'))
        .unwrap_or(&t);
    let (number, shift) = match t.chars().last()? {
        'k' => (&t[..t.len() - 1], 10),
        'm' => (&t[..t.len() - 1], 20),
        'g' => (&t[..t.len() - 1], 30),
        't' => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let value: f64 = number.trim().parse().ok()?;
    (value.is_finite() && value > 0.0).then(|| (value * (1u64 << shift) as f64) as u64)
}

/// Bytes per parameter of a ggml type.
fn bytes_per_parameter(t: GgmlDType) -> f64 {
    t.type_size() as f64 / t.block_size() as f64
}

/// The options `--max-memory` tries, best quality first: the model's own precision with no
/// offload or with the transformer leaving the device while the VAE works; then Q8_0 (half
/// the memory, close to lossless); then the model's precision with its blocks streamed from
/// host memory (slower: every step copies the weights); then Q4_K; then Q4_K streamed.
const CANDIDATES: [(Option<GgmlDType>, Offload); 9] = [
    (None, Offload::None),
    (None, Offload::Model),
    (Some(GgmlDType::Q8_0), Offload::None),
    (Some(GgmlDType::Q8_0), Offload::Model),
    (None, Offload::Blocks),
    (Some(GgmlDType::Q4K), Offload::None),
    (Some(GgmlDType::Q4K), Offload::Model),
    (Some(GgmlDType::Q8_0), Offload::Blocks),
    (Some(GgmlDType::Q4K), Offload::Blocks),
];

/// The memory each phase of a run holds on the device with these options.
pub fn predict(inputs: &PlanInputs, options: MemoryOptions, budget_bytes: u64) -> MemoryPlan {
    // The CPU computes half precision in f32 (candle widens it), so work memory is f32 there.
    let elem = if inputs.device_is_cpu {
        4
    } else {
        inputs.dtype.size_in_bytes() as u64
    };
    let dense = inputs.dtype.size_in_bytes() as f64;
    let ParameterCounts {
        blocks,
        largest_block,
        rest,
    } = inputs.transformer_parameters;
    let total = (blocks + rest) as f64;
    // Embedders and final layer stay F16 when quantized, as `icedit quantize` keeps them.
    let (block_bytes, rest_bytes) = match (inputs.transformer_file_bytes, options.quantize) {
        (Some(file), _) => (
            file as f64 * blocks as f64 / total,
            file as f64 * rest as f64 / total,
        ),
        (None, Some(t)) => (
            blocks as f64 * bytes_per_parameter(t),
            rest as f64 * dense.min(2.0),
        ),
        (None, None) => (blocks as f64 * dense, rest as f64 * dense),
    };
    let largest_block_bytes = block_bytes * largest_block as f64 / blocks.max(1) as f64;
    let resident_transformer = match options.offload {
        Offload::Blocks => rest_bytes + 2.0 * largest_block_bytes,
        _ => rest_bytes + block_bytes,
    } as u64;
    let c = &inputs.transformer;
    let (h, m) = (c.hidden_size() as u64, c.mlp_hidden_size() as u64);
    let tokens = inputs.image_tokens + inputs.text_tokens;
    // A block's live activations (streams, q, k, v, the MLP before and after its GELU, the
    // single block's concatenation) and attention's score chunk (256 MiB in f32).
    let denoise_work = tokens * (10 * h + 4 * m) * elem + (256 << 20);
    let vae_weights = inputs.vae_parameters * dense as u64;
    // The decoder's widest layers run at full resolution with 128 channels; a 3x3 convolution
    // unfolds its input nine times.
    let vae_work = inputs.pixels * 128 * elem * 12;
    let text_weights = match inputs.text_encoder_2_file_bytes {
        Some(file) => file + (inputs.text_encoder_parameters / 40) * dense as u64,
        None => inputs.text_encoder_parameters * dense as u64,
    };
    let text_work = inputs.text_tokens * 4096 * elem * 16;
    // The CUDA context, cuBLAS's workspace and the allocator's slack.
    let runtime = if inputs.device_is_cpu { 0 } else { 768 << 20 };
    let transformer_during_vae = match options.offload {
        Offload::None => resident_transformer,
        _ => 0,
    };
    let vae_during_denoise = match options.offload {
        Offload::None => vae_weights,
        _ => 0,
    };
    // A server keeps its text encoders loaded through every phase.
    let kept_text = if inputs.text_encoders_kept {
        text_weights
    } else {
        0
    };
    let phases = vec![
        PlannedPhase {
            phase: "text",
            weights_bytes: text_weights,
            work_bytes: text_work + runtime,
        },
        PlannedPhase {
            phase: "denoise",
            weights_bytes: resident_transformer + vae_during_denoise + kept_text,
            work_bytes: denoise_work + runtime,
        },
        PlannedPhase {
            phase: "vae",
            weights_bytes: transformer_during_vae + vae_weights + kept_text,
            work_bytes: vae_work + runtime,
        },
    ];
    MemoryPlan {
        options,
        dtype: inputs.dtype,
        budget_bytes,
        phases,
    }
}

/// The first of [`CANDIDATES`] whose predicted peak fits `budget_bytes`; an error naming the
/// smallest plan's peak when none does. A transformer stored quantized is not quantized again.
pub fn plan(inputs: &PlanInputs, budget_bytes: u64) -> Result<MemoryPlan, String> {
    let candidates = CANDIDATES
        .iter()
        .filter(|(q, _)| q.is_none() || inputs.transformer_file_bytes.is_none());
    let mut smallest: Option<MemoryPlan> = None;
    for &(quantize, offload) in candidates {
        let plan = predict(inputs, MemoryOptions { offload, quantize }, budget_bytes);
        if plan.predicted_peak() <= budget_bytes {
            return Ok(plan);
        }
        if smallest
            .as_ref()
            .is_none_or(|s| plan.predicted_peak() < s.predicted_peak())
        {
            smallest = Some(plan);
        }
    }
    let smallest = smallest.expect("at least one candidate");
    let over = smallest
        .phases
        .iter()
        .filter(|p| p.weights_bytes + p.work_bytes > budget_bytes)
        .map(|p| p.phase)
        .collect::<Vec<_>>();
    let fix = if over == ["text"] {
        "use a quantized T5 (--text-encoder-2 with a Q8_0 or Q4 GGUF, about 5 or 3 GB)"
    } else {
        "make the image smaller, or use a quantized transformer file (--transformer with a \
         Q4 GGUF)"
    };
    Err(format!(
        "no plan fits {}: even with {}, the {} phase needs about {}; allow more memory, or {fix}",
        gib(budget_bytes),
        smallest
            .describe()
            .lines()
            .next()
            .and_then(|l| l.split_once(": "))
            .map_or("", |(_, choice)| choice
                .split("; ")
                .next()
                .unwrap_or(choice)),
        over.join(" and "),
        gib(smallest.predicted_peak())
    ))
}

/// This process's peak resident memory so far (`VmHWM`), where the system reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The device memory in use (total minus free, as the driver reports it), sampled every few
/// milliseconds from a thread of its own while this lives; `None` where the device is not
/// CUDA.
pub struct DeviceMemoryWatch {
    peak: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DeviceMemoryWatch {
    pub fn start(device: &Device) -> Option<Self> {
        let used = device_memory_reader(device)?;
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(used().unwrap_or(0)));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (peak_in, stop_in) = (peak.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            use std::sync::atomic::Ordering;
            while !stop_in.load(Ordering::Relaxed) {
                if let Some(bytes) = used() {
                    peak_in.fetch_max(bytes, Ordering::Relaxed);
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        });
        Some(Self {
            peak,
            stop,
            thread: Some(thread),
        })
    }

    /// The most seen in use so far, in bytes.
    pub fn peak_bytes(&self) -> u64 {
        self.peak.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for DeviceMemoryWatch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

type UsedBytes = Box<dyn Fn() -> Option<u64> + Send>;

#[cfg(feature = "cuda")]
fn device_memory_reader(device: &Device) -> Option<UsedBytes> {
    let Device::Cuda(cuda) = device else {
        return None;
    };
    let context = cuda.cuda_stream().context().clone();
    Some(Box::new(move || {
        let (free, total) = context.mem_get_info().ok()?;
        Some((total - free) as u64)
    }))
}

#[cfg(not(feature = "cuda"))]
fn device_memory_reader(_device: &Device) -> Option<UsedBytes> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use icedit_flux::FluxTransformer;

    fn fill_at(width: u64, height: u64, dtype: DType) -> PlanInputs {
        // FLUX.1 Fill's shapes, an ICEdit diptych of `width` x `height` pixels, 512 T5 tokens.
        PlanInputs {
            transformer: FluxConfig::fill(),
            transformer_parameters: FluxTransformer::parameters(&FluxConfig::fill()).unwrap(),
            transformer_file_bytes: None,
            text_encoder_parameters: 4_762_000_000 + 123_000_000,
            text_encoder_2_file_bytes: None,
            vae_parameters: 83_800_000,
            image_tokens: (width / 16) * (height / 16),
            text_tokens: 512,
            pixels: width * height,
            dtype,
            device_is_cpu: false,
            text_encoders_kept: false,
        }
    }

    #[test]
    fn the_real_transformer_has_twelve_billion_parameters() {
        let ParameterCounts {
            blocks,
            largest_block: largest,
            rest,
        } = FluxTransformer::parameters(&FluxConfig::fill()).unwrap();
        let total = blocks + rest;
        // FLUX.1 Fill [dev]: 11.9B parameters (diffusers' `num_parameters()`).
        assert!((11_850_000_000..11_950_000_000).contains(&total), "{total}");
        assert!(largest < blocks / 30);
    }

    #[test]
    fn plans_follow_the_budget() {
        let inputs = fill_at(1024, 512, DType::BF16);
        let gib = |n: u64| n << 30;
        let chosen = |budget| plan(&inputs, gib(budget)).map(|p| p.options);
        let opts = |quantize, offload| MemoryOptions { offload, quantize };
        assert_eq!(chosen(48), Ok(opts(None, Offload::None)));
        assert_eq!(chosen(24), Ok(opts(None, Offload::Model)));
        assert_eq!(chosen(16), Ok(opts(Some(GgmlDType::Q8_0), Offload::None)));
        assert_eq!(chosen(12), Ok(opts(None, Offload::Blocks)));
        // T5-XXL in bf16 alone is 9 GiB: 8 GiB needs a quantized T5, and says so.
        let err = chosen(8).unwrap_err();
        assert!(
            err.contains("no plan fits 8.0 GiB") && err.contains("--text-encoder-2"),
            "{err}"
        );
        let with_gguf_t5 = PlanInputs {
            text_encoder_2_file_bytes: Some(5_060_000_000),
            ..inputs.clone()
        };
        let p = plan(&with_gguf_t5, gib(8)).unwrap();
        assert_eq!(p.options, opts(None, Offload::Blocks));
        assert!(p.predicted_peak() <= gib(8), "{}", p.describe());
        for budget in [48, 24, 16, 12] {
            let p = plan(&inputs, gib(budget)).unwrap();
            assert!(p.predicted_peak() <= gib(budget), "{}", p.describe());
        }
        // A GGUF transformer is never quantized again.
        let gguf = PlanInputs {
            transformer_file_bytes: Some(6_800_000_000),
            ..with_gguf_t5
        };
        let p = plan(&gguf, gib(12)).unwrap();
        assert_eq!(p.options, opts(None, Offload::None));
        // A server keeps T5-XXL and CLIP (9 GiB in bf16) beside the transformer: 24 GiB then
        // needs Q8_0.
        let server = PlanInputs {
            text_encoders_kept: true,
            ..inputs.clone()
        };
        assert_eq!(
            plan(&server, gib(24)).unwrap().options,
            opts(Some(GgmlDType::Q8_0), Offload::None)
        );
    }

    /// The plans the README lists (`cargo test -p icedit-pipeline plans_for_the_readme --
    /// --nocapture`).
    #[test]
    fn plans_for_the_readme() {
        let inputs = fill_at(1024, 512, DType::BF16);
        for budget in [48u64, 24, 16, 12, 8] {
            match plan(&inputs, budget << 30) {
                Ok(p) => println!("{}", p.describe()),
                Err(e) => println!("{e}"),
            }
        }
        let with_gguf_t5 = PlanInputs {
            text_encoder_2_file_bytes: Some(5_060_000_000),
            ..inputs
        };
        println!("{}", plan(&with_gguf_t5, 8 << 30).unwrap().describe());
    }

    #[test]
    fn sizes_read_as_users_write_them() {
        assert_eq!(parse_size("24G"), Some(24 << 30));
        assert_eq!(parse_size("24GiB"), Some(24 << 30));
        assert_eq!(parse_size("12gb"), Some(12 << 30));
        assert_eq!(parse_size("1500M"), Some(1500 << 20));
        assert_eq!(parse_size("0.5G"), Some(1 << 29));
        for bad in ["", "G", "-3G", "12X", "nanG"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }
}
