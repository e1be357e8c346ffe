//! Rust side of the transformer benchmark (driven by benches/transformer_bench.py, which runs
//! PyTorch on the same checkpoint and inputs in the same run and prints the ratio).
//!
//! cargo bench -p icedit-adapters --bench transformer_forward -- MODEL_DIR INPUTS.safetensors OUT.safetensors REPS [DTYPE] [cpu|cuda] [ADAPTER.safetensors merge|runtime [TOP_K]]
//!
//! Prints one JSON line: load time, median forward time, resident memory after loading and at peak.
//! With an adapter (benches/adapter_bench.py), it is applied after loading, merged or at run time.

use std::time::Instant;

use candle_core::Device;
use icedit_adapters::{apply_adapters, AdapterChoice, AdapterFile, ApplyMode};
use icedit_flux::{parse_dtype, Checkpoint, FluxInput, FluxTransformer};

// Large tensors come and go every op: an allocator that keeps freed pages mapped saves a
// page fault per 4 KiB on each of them (the `icedit` binary uses it too).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let [model_dir, inputs, out_path, reps, rest @ ..] = args.as_slice() else {
        return Err(
            "usage: transformer_forward MODEL_DIR INPUTS OUT REPS [DTYPE] [cpu|cuda] [ADAPTER merge|runtime [TOP_K]]".into(),
        );
    };
    let reps: usize = reps.parse()?;
    let dtype = parse_dtype(rest.first().map_or("f32", String::as_str))?;
    let device = match rest.get(1).map(String::as_str) {
        Some("cuda") => Device::new_cuda(0)?,
        _ => Device::Cpu,
    };

    let start = Instant::now();
    let checkpoint = Checkpoint::open(model_dir.as_ref())?;
    let mut model = FluxTransformer::load(&checkpoint, dtype, &device)?;
    drop(checkpoint);
    if let Some(adapter) = rest.get(2) {
        let mode = match rest.get(3).map(String::as_str) {
            Some("runtime") => ApplyMode::Runtime,
            _ => ApplyMode::Merge,
        };
        let choice = AdapterChoice {
            name: adapter.clone(),
            file: AdapterFile::read(adapter.as_ref())?,
            scale: 1.0,
            top_k: rest.get(4).map(|k| k.parse()).transpose()?,
        };
        apply_adapters(&mut model, vec![choice], mode)?;
    }
    let load_s = start.elapsed().as_secs_f64();
    let rss_after_load = rss_kib("VmRSS:");

    let io = candle_core::safetensors::load(inputs, &device)?;
    let input = FluxInput::from_named(&io)?;
    let mut out = model.forward(&input)?; // warm-up
    device.synchronize()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        out = model.forward(&input)?;
        device.synchronize()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let out = out.to_dtype(candle_core::DType::F32)?;
    out.save_safetensors("out", out_path)?;
    println!(
        "{{\"load_s\": {load_s:.3}, \"forward_s\": {:.4}, \"forward_min_s\": {:.4}, \"rss_after_load_mib\": {}, \"peak_rss_mib\": {}, \"threads\": {}}}",
        times[times.len() / 2],
        times[0],
        rss_after_load / 1024,
        rss_kib("VmHWM:") / 1024,
        candle_core::utils::get_num_threads(),
    );
    Ok(())
}
