//! Hostile and careless use (issue 16), one test per class, several cases each: every case
//! exits 1 with a message that says what was wrong, leaves every input unchanged (hashed before
//! and after) and writes nothing; the cases that would allocate gigabytes finish in well under
//! a second with little memory (peak RSS of the child, measured with wait4).

use icedit_test_support::fixtures;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn tiny_model() -> PathBuf {
    fixtures().join("fill_pipeline/tiny")
}

fn source_png() -> PathBuf {
    fixtures().join("edit/source.png")
}

fn moe_lora() -> PathBuf {
    fixtures().join("edit/adapters/moe_lora.safetensors")
}

/// What a run of the binary did.
struct Run {
    code: i32,
    stderr: String,
    seconds: f64,
    /// Peak resident memory of the child, MiB.
    peak_mib: f64,
}

/// Runs `icedit ARGS` in `cwd` offline on an empty Hub cache, measuring time and peak RSS.
fn icedit(args: &[&str], cwd: &Path) -> Run {
    let home = cwd.join(".hf-home");
    let started = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_icedit"))
        .args(args)
        .current_dir(cwd)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", &home)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run icedit");
    let pid = child.id() as libc::pid_t;
    // Read stderr on a thread so a chatty child never blocks on a full pipe.
    let mut stderr_pipe = child.stderr.expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stderr_pipe, &mut text).ok();
        text
    });
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(waited, pid, "wait4");
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    };
    Run {
        code,
        stderr: reader.join().unwrap(),
        seconds: started.elapsed().as_secs_f64(),
        peak_mib: usage.ru_maxrss as f64 / 1024.0,
    }
}

/// Hashes of every file under `dir` (recursively, links not followed): "unchanged" and
/// "nothing written" are one comparison.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, u64> {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                let mut h = DefaultHasher::new();
                std::fs::read(&path).unwrap().hash(&mut h);
                out.insert(path, h.finish());
            } else {
                out.insert(path, 0);
            }
        }
    }
    out
}

/// A case must fail cleanly: exit 1, `expect` in the message, nothing changed in `dir`.
fn refused(what: &str, args: &[&str], dir: &Path, expect: &str) -> Run {
    let before = snapshot(dir);
    let run = icedit(args, dir);
    assert_eq!(run.code, 1, "{what}: exit {}\n{}", run.code, run.stderr);
    assert!(
        run.stderr.contains(expect),
        "{what}: expected `{expect}` in:\n{}",
        run.stderr
    );
    assert!(!run.stderr.contains("panicked"), "{what}: {}", run.stderr);
    let after = snapshot(dir);
    assert_eq!(before, after, "{what}: files changed or were written");
    run
}

/// A work folder holding a copy of the photo and the tiny MoE-LoRA.
fn workdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(source_png(), dir.path().join("photo.png")).unwrap();
    std::fs::copy(moe_lora(), dir.path().join("moe.safetensors")).unwrap();
    std::fs::create_dir(dir.path().join(".hf-home")).unwrap();
    dir
}

fn edit_args<'a>(model: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "edit",
        "--model",
        model,
        "--image",
        "photo.png",
        "--instruction",
        "make it night",
        "--lora",
        "moe.safetensors",
        "--width",
        "64",
        "--dtype",
        "f32",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    args
}

#[test]
fn outputs_never_overwrite_inputs() {
    let dir = workdir();
    let d = dir.path();
    let model = tiny_model();
    let model = model.to_str().unwrap();
    std::fs::copy(source_png(), d.join("photo-diptych.png")).unwrap();
    std::fs::copy(source_png(), d.join("shot-7.png")).unwrap();
    std::fs::hard_link(d.join("photo.png"), d.join("hard.png")).unwrap();
    std::os::unix::fs::symlink(d.join("photo.png"), d.join("soft.png")).unwrap();
    std::fs::create_dir(d.join("cands")).unwrap();
    std::fs::hard_link(d.join("photo.png"), d.join("cands/winner-seed3.png")).unwrap();

    let never = "never overwrites";
    // The example: --save-diptych's OUT-diptych.png is the photo.
    let mut args = edit_args(model, &["--out", "photo.png", "--save-diptych"]);
    args[4] = "photo-diptych.png";
    refused("diptych onto the photo", &args, d, never);
    // --out is the photo under another spelling, a hard link, or a symbolic link.
    for out in ["./photo.png", "hard.png", "soft.png"] {
        refused(out, &edit_args(model, &["--out", out]), d, never);
    }
    // `-SEED` and `{seed}` expansions landing on the input shot-7.png.
    let mut args = edit_args(model, &["--seeds", "6,7", "--out", "shot-{seed}.png"]);
    args[4] = "shot-7.png";
    refused("{seed} expansion", &args, d, never);
    let mut args = edit_args(model, &["--seeds", "7,8", "--out", "shot.png"]);
    args[4] = "shot-7.png";
    refused("-SEED suffix", &args, d, never);
    // The adapter file and the latents are inputs too.
    std::fs::hard_link(d.join("moe.safetensors"), d.join("moe.png")).unwrap();
    refused(
        "adapter",
        &edit_args(model, &["--out", "moe.png"]),
        d,
        never,
    );
    // A candidate file of the search folder is a link to the photo.
    refused(
        "candidates",
        &edit_args(
            model,
            &[
                "--seeds",
                "3",
                "--judge",
                "openai:http://127.0.0.1:9/v1",
                "--early-steps",
                "1",
                "--steps",
                "2",
                "--save-candidates",
                "cands",
                "--out",
                "best.png",
            ],
        ),
        d,
        "never overwrites",
    );
    // Nothing goes into the model folder.
    let copy = d.join("model");
    copy_dir(&tiny_model(), &copy);
    let inside = copy.join("out.png");
    refused(
        "model folder",
        &edit_args(copy.to_str().unwrap(), &["--out", inside.to_str().unwrap()]),
        d,
        "inside the model folder",
    );
    // fill: the mask and the image.
    std::fs::copy(fixtures().join("edit/mask.png"), d.join("mask.png")).unwrap();
    for out in ["mask.png", "photo.png"] {
        refused(
            out,
            &[
                "fill",
                "--model",
                model,
                "--image",
                "photo.png",
                "--mask",
                "mask.png",
                "--prompt",
                "x",
                "--out",
                out,
            ],
            d,
            never,
        );
    }
}

#[test]
fn huge_numbers_are_refused_before_allocating() {
    let dir = workdir();
    let d = dir.path();
    let model = tiny_model();
    let model = model.to_str().unwrap();
    // A model folder whose transformer config claims absurd widths.
    let absurd = d.join("absurd");
    copy_dir(&tiny_model(), &absurd);
    let config_path = absurd.join("transformer/config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["num_attention_heads"] = serde_json::json!(1_000_000_000u64);
    config["attention_head_dim"] = serde_json::json!(1_000_000_000u64);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let absurd_transformer = absurd.join("transformer");

    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            "steps",
            edit_args(model, &["--steps", "1000000000000", "--out", "o.png"]),
            "--steps",
        ),
        (
            "seed count",
            edit_args(
                model,
                &[
                    "--seeds",
                    "1000000000000000000",
                    "--judge",
                    "openai:http://127.0.0.1:9/v1",
                    "--out",
                    "o.png",
                ],
            ),
            "--seeds",
        ),
        (
            "seed overflow",
            edit_args(
                model,
                &[
                    "--seed",
                    "18446744073709551615",
                    "--seeds",
                    "4",
                    "--judge",
                    "openai:http://127.0.0.1:9/v1",
                    "--out",
                    "o.png",
                ],
            ),
            "2^64",
        ),
        (
            "expand u32 overflow",
            vec![
                "fill",
                "--model",
                model,
                "--image",
                "photo.png",
                "--expand",
                "0,0,4294967295,0",
                "--prompt",
                "x",
                "--out",
                "o.png",
            ],
            "--expand",
        ),
        (
            "expand huge canvas",
            vec![
                "fill",
                "--model",
                model,
                "--image",
                "photo.png",
                "--expand",
                "100000",
                "--prompt",
                "x",
                "--out",
                "o.png",
            ],
            "resize it first",
        ),
        (
            "forward size",
            vec![
                "inspect",
                "--model",
                "absurd/transformer",
                "--forward",
                "100000x100000",
            ],
            "--forward",
        ),
        (
            "text tokens",
            vec![
                "inspect",
                "--model",
                "absurd/transformer",
                "--forward",
                "64x64",
                "--text-tokens",
                "1000000000",
            ],
            "--text-tokens",
        ),
        (
            "endless latents",
            edit_args(model, &["--latents", "/dev/zero", "--out", "o.png"]),
            "not a regular file",
        ),
        (
            "absurd config",
            vec!["inspect", "--model", absurd_transformer.to_str().unwrap()],
            "num_attention_heads",
        ),
        (
            "max seq len",
            edit_args(model, &["--max-seq-len", "100000000", "--out", "o.png"]),
            "--max-seq-len",
        ),
    ];
    for (what, args, expect) in &cases {
        let run = refused(what, args, d, expect);
        assert!(run.seconds < 1.0, "{what}: took {:.2}s", run.seconds);
        assert!(
            run.peak_mib < 300.0,
            "{what}: peak RSS {:.0} MiB",
            run.peak_mib
        );
    }
}

#[test]
fn arguments_and_output_locations_are_checked_before_any_download() {
    // The model is a Hub repo that is not cached and the Hub is offline: anything that got as
    // far as the model (or the default adapter) would fail with the Hub's message instead.
    let dir = workdir();
    let d = dir.path();
    std::fs::write(d.join("afile"), b"x").unwrap();
    std::fs::create_dir(d.join("dir.png")).unwrap();
    let hub = "black-forest-labs/FLUX.1-Fill-dev";
    let edit = |extra: &[&'static str]| {
        let mut args = vec![
            "edit",
            "--model",
            hub,
            "--image",
            "photo.png",
            "--instruction",
            "night",
        ];
        args.extend_from_slice(extra);
        args
    };
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            "steps 0",
            edit(&["--steps", "0", "--out", "o.png"]),
            "--steps 0",
        ),
        (
            "guidance nan",
            edit(&["--guidance", "NaN", "--out", "o.png"]),
            "--guidance",
        ),
        (
            "guidance inf",
            edit(&["--guidance", "inf", "--out", "o.png"]),
            "--guidance",
        ),
        (
            "max seq 0",
            edit(&["--max-seq-len", "0", "--out", "o.png"]),
            "--max-seq-len",
        ),
        (
            "max seq 513",
            edit(&["--max-seq-len", "513", "--out", "o.png"]),
            "--max-seq-len",
        ),
        (
            "missing folder",
            edit(&["--out", "nowhere/o.png"]),
            "does not exist",
        ),
        (
            "{seed} folder",
            edit(&["--seeds", "1,2", "--out", "run-{seed}/o.png"]),
            "does not exist",
        ),
        (
            "out under a file",
            edit(&["--out", "afile/o.png"]),
            "not a folder",
        ),
        (
            "out is a folder",
            edit(&["--out", "dir.png"]),
            "not a regular file",
        ),
        (
            "candidates path is a file",
            edit(&[
                "--seeds",
                "2",
                "--judge",
                "openai:http://127.0.0.1:9/v1",
                "--save-candidates",
                "afile",
                "--out",
                "o.png",
            ]),
            "is a file",
        ),
        (
            "lora scale",
            edit(&["--lora-scale", "inf", "--out", "o.png"]),
            "--lora-scale",
        ),
        (
            "fill steps",
            vec![
                "fill",
                "--model",
                hub,
                "--image",
                "photo.png",
                "--expand",
                "16",
                "--prompt",
                "x",
                "--steps",
                "0",
                "--out",
                "o.png",
            ],
            "--steps 0",
        ),
        (
            "fill output folder",
            vec![
                "fill",
                "--model",
                hub,
                "--image",
                "photo.png",
                "--expand",
                "16",
                "--prompt",
                "x",
                "--out",
                "nowhere/o.png",
            ],
            "does not exist",
        ),
    ];
    for (what, args, expect) in &cases {
        refused(what, args, d, expect);
    }
    // An existing read-only result is not replaced.
    std::fs::write(d.join("ro.png"), b"keep").unwrap();
    let mut perms = std::fs::metadata(d.join("ro.png")).unwrap().permissions();
    perms.set_readonly(true);
    std::fs::set_permissions(d.join("ro.png"), perms).unwrap();
    refused("read-only", &edit(&["--out", "ro.png"]), d, "read-only");
}

#[test]
fn hf_references_always_mean_the_hub() {
    let dir = workdir();
    let d = dir.path();
    let model = tiny_model();
    let model = model.to_str().unwrap();
    // A local folder named like the default adapter's repo, which must not shadow it.
    std::fs::create_dir_all(d.join("sanaka87/ICEdit-MoE-LoRA")).unwrap();
    std::fs::copy(
        moe_lora(),
        d.join("sanaka87/ICEdit-MoE-LoRA/moe.safetensors"),
    )
    .unwrap();
    let mut args = edit_args(model, &["--out", "o.png"]);
    for spec in ["hf:sanaka87/ICEdit-MoE-LoRA", "icedit-moe"] {
        args[8] = spec;
        refused(spec, &args, d, "HF_HUB_OFFLINE");
    }
    for spec in ["hf:../../etc/passwd", "hf:./sanaka87/x", "hf:/etc/passwd"] {
        args[8] = spec;
        refused(spec, &args, d, spec);
    }
    // A manifest's repo is a repo id or a folder beside it, never an absolute path.
    std::fs::write(
        d.join("evil.toml"),
        "name = \"evil\"\nrepo = \"/etc\"\nkind = \"lora\"\n",
    )
    .unwrap();
    args[8] = "evil.toml";
    refused("absolute manifest repo", &args, d, "never an absolute path");
    std::fs::write(
        d.join("prompt.toml"),
        "name = \"p\"\nrepo = \"./sanaka87/ICEdit-MoE-LoRA\"\nkind = \"moe-lora\"\nprompt = \"nope\"\n",
    )
    .unwrap();
    args[8] = "prompt.toml";
    refused(
        "unknown prompt template",
        &args,
        d,
        "unknown prompt template `nope`",
    );
}

#[test]
fn bad_files_and_models_are_refused() {
    let dir = workdir();
    let d = dir.path();
    let model = tiny_model();
    let model = model.to_str().unwrap();
    // A named pipe as the photo: refused at once rather than blocking forever.
    let fifo = d.join("pipe.png");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) }, 0);
    let mut args = edit_args(model, &["--out", "o.png"]);
    args[4] = "pipe.png";
    let run = refused("fifo", &args, d, "not a regular file");
    assert!(run.seconds < 5.0);
    // A truncated JPEG (PIL refuses it; decoders would fill the rest with gray).
    let jpeg = d.join("photo.jpg");
    image::open(source_png()).unwrap().save(&jpeg).unwrap();
    let bytes = std::fs::read(&jpeg).unwrap();
    std::fs::write(d.join("cut.jpg"), &bytes[..bytes.len() * 2 / 3]).unwrap();
    args[4] = "cut.jpg";
    refused("truncated jpeg", &args, d, "truncated");
    args[4] = "photo.png";
    // Latents holding a NaN: refused when read, before the model loads.
    let mut values = vec![0f32; 16 * 6 * 16];
    values[7] = f32::NAN;
    let latents =
        candle_core::Tensor::from_vec(values, (1, 16, 6, 16), &candle_core::Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("latents".to_string(), latents)]),
        d.join("nan.safetensors"),
    )
    .unwrap();
    let latent_args = edit_args(model, &["--latents", "nan.safetensors", "--out", "o.png"]);
    refused("NaN latents", &latent_args, d, "NaN or infinite");

    // model_index.json naming another pipeline; a scheduler with 0 training timesteps.
    let other = d.join("other");
    copy_dir(&tiny_model(), &other);
    let index = other.join("model_index.json");
    let text = std::fs::read_to_string(&index).unwrap();
    std::fs::write(
        &index,
        text.replace("FluxFillPipeline", "StableDiffusionXLPipeline"),
    )
    .unwrap();
    let mut other_args = edit_args("other", &["--out", "o.png"]);
    other_args[2] = "other";
    refused(
        "SDXL model_index",
        &other_args,
        d,
        "StableDiffusionXLPipeline",
    );
    std::fs::write(&index, text).unwrap();
    let scheduler = other.join("scheduler/scheduler_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&scheduler).unwrap()).unwrap();
    config["num_train_timesteps"] = serde_json::json!(0);
    std::fs::write(&scheduler, config.to_string()).unwrap();
    refused("0 timesteps", &other_args, d, "num_train_timesteps");
}

#[test]
fn a_signal_leaves_no_partial_output() {
    let dir = workdir();
    let d = dir.path();
    let model = tiny_model();
    let before = snapshot(d);
    let child = Command::new(env!("CARGO_BIN_EXE_icedit"))
        .args(edit_args(
            model.to_str().unwrap(),
            &["--steps", "1000", "--out", "o.png"],
        ))
        .current_dir(d)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", d.join(".hf-home"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(before, snapshot(d), "nothing written, no temp file left");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}
