//! Without the `cuda` feature this does nothing. With it, compiles kernels/*.cu with nvcc (through
//! cudaforge, like candle-flash-attn) into a static library and links it.
//!
//! Environment:
//! - `ICEDIT_CUTLASS_INCLUDE`: the CUTLASS include dir (holding `cute/` and `cutlass/`); default
//!   `<workspace>/.cuda/cutlass/include` (`$ICEDIT_CUDA_DIR/cutlass/include` if that is set),
//!   which `scripts/cutlass-headers.sh` fills.
//! - `CUDA_COMPUTE_CAP`: the GPU to compile for, default 90 (sm_90a: H100/H200); at least 80.
//! - `CUDAFORGE_THREADS`: parallel nvcc jobs (default: half the CPUs; each needs ~2-3 GB RAM).
//! - `ICEDIT_FLASH_ATTN_BUILD_DIR`: keep the objects there (an existing dir) instead of OUT_DIR,
//!   so `cargo clean` or a new target dir does not recompile them (like candle's
//!   `CANDLE_FLASH_ATTN_BUILD_DIR`).

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    cuda::build();
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::path::{Path, PathBuf};

    const KERNEL_FILES: [&str; 3] = [
        "kernels/flash_api.cu",
        "kernels/flash_fwd_hdim128_bf16_sm80.cu",
        "kernels/flash_fwd_hdim128_fp16_sm80.cu",
    ];

    const HEADER_FILES: [&str; 11] = [
        "kernels/block_info.h",
        "kernels/dropout.h",
        "kernels/flash.h",
        "kernels/flash_fwd_kernel.h",
        "kernels/flash_fwd_launch_template.h",
        "kernels/kernel_traits.h",
        "kernels/mask.h",
        "kernels/philox.cuh",
        "kernels/rotary.h",
        "kernels/softmax.h",
        "kernels/utils.h",
    ];

    fn fnv1a(hash: &mut u64, bytes: &[u8]) {
        for &b in bytes {
            *hash ^= u64::from(b);
            *hash = hash.wrapping_mul(1099511628211);
        }
    }

    fn cutlass_include(manifest_dir: &Path) -> PathBuf {
        let (dir, from) = if let Some(dir) = std::env::var_os("ICEDIT_CUTLASS_INCLUDE") {
            (PathBuf::from(dir), "ICEDIT_CUTLASS_INCLUDE")
        } else if let Some(cuda_dir) = std::env::var_os("ICEDIT_CUDA_DIR") {
            (
                PathBuf::from(cuda_dir).join("cutlass/include"),
                "ICEDIT_CUDA_DIR",
            )
        } else {
            (
                manifest_dir.join("../../.cuda/cutlass/include"),
                "the default location",
            )
        };
        for marker in ["cute/tensor.hpp", "cutlass/cutlass.h"] {
            if !dir.join(marker).is_file() {
                panic!(
                    "\n\nicedit-flash-attn: the CUTLASS headers are missing: no {marker} in {} \
                     (from {from}).\nRun `scripts/cutlass-headers.sh` at the repository root \
                     (it installs the pinned nvidia-cutlass wheel's headers into \
                     .cuda/cutlass/include), or set ICEDIT_CUTLASS_INCLUDE to a directory \
                     holding cute/ and cutlass/.\n\n",
                    dir.display()
                );
            }
        }
        dir.canonicalize().unwrap_or(dir)
    }

    pub fn build() {
        for var in [
            "ICEDIT_CUTLASS_INCLUDE",
            "ICEDIT_CUDA_DIR",
            "CUDA_COMPUTE_CAP",
            "CUDAFORGE_THREADS",
            "ICEDIT_FLASH_ATTN_BUILD_DIR",
            "NVCC",
            "CUDA_HOME",
        ] {
            println!("cargo::rerun-if-env-changed={var}");
        }
        for f in KERNEL_FILES.iter().chain(HEADER_FILES.iter()) {
            println!("cargo::rerun-if-changed={f}");
        }

        let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
        let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
        let build_dir = match std::env::var_os("ICEDIT_FLASH_ATTN_BUILD_DIR") {
            None => out_dir,
            Some(dir) => PathBuf::from(&dir).canonicalize().unwrap_or_else(|e| {
                panic!("ICEDIT_FLASH_ATTN_BUILD_DIR={dir:?} must be an existing directory: {e}")
            }),
        };
        let include = cutlass_include(&manifest_dir);

        // Default sm_90 (cudaforge turns 90 into sm_90a, as for candle's kernels).
        let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
        let cap_num: usize = cap
            .trim()
            .trim_end_matches(|c: char| c.is_ascii_alphabetic())
            .parse()
            .unwrap_or_else(|_| {
                panic!("CUDA_COMPUTE_CAP={cap:?} is not a compute capability like 90")
            });
        if cap_num < 80 {
            panic!(
                "icedit-flash-attn needs compute capability 8.0 or newer (CUDA_COMPUTE_CAP={cap})"
            );
        }

        // The object cache keys on the nvcc arguments: fold in the vendored headers and the
        // CUTLASS version so that a change to either recompiles.
        let mut hash = 14695981039346656037u64;
        for f in HEADER_FILES {
            fnv1a(&mut hash, f.as_bytes());
            fnv1a(&mut hash, &std::fs::read(manifest_dir.join(f)).unwrap());
        }
        fnv1a(
            &mut hash,
            &std::fs::read(include.join("cutlass/version.h")).unwrap_or_default(),
        );
        let hash_arg = format!("-DICEDIT_FLASH_ATTN_SOURCE_HASH=0x{hash:016x}");
        let include_arg = format!("-I{}", include.display());

        let kernels: Vec<PathBuf> = KERNEL_FILES.iter().map(|f| manifest_dir.join(f)).collect();
        let mut builder = cudaforge::KernelBuilder::new()
            .source_files(kernels)
            .watch(HEADER_FILES.iter().map(|f| manifest_dir.join(f)))
            .out_dir(&build_dir)
            .compute_cap_arch(cap.trim())
            .arg("-std=c++17")
            .arg("-O3")
            .arg("-U__CUDA_NO_HALF_OPERATORS__")
            .arg("-U__CUDA_NO_HALF_CONVERSIONS__")
            .arg("-U__CUDA_NO_HALF2_OPERATORS__")
            .arg("-U__CUDA_NO_BFLOAT16_CONVERSIONS__")
            .arg("--expt-relaxed-constexpr")
            .arg("--expt-extended-lambda")
            .arg("--use_fast_math")
            .arg(&include_arg)
            .arg(&hash_arg)
            // No `nvcc --threads`: one file is one device arch; parallelism is across files.
            .nvcc_thread_patterns(&[] as &[&str], 0)
            .thread_percentage(0.5);
        if cap_num < 90 {
            // sm8x devices (8.6/8.9) run the 128 x 32 tile; an sm_90+ build never runs there.
            builder = builder.arg("-DICEDIT_FLASH_SM8X");
        }

        let lib = build_dir.join("libicedit_flashattn.a");
        if let Err(e) = builder.build_lib(&lib) {
            panic!("icedit-flash-attn: building the CUDA kernels failed: {e}");
        }

        println!("cargo::rustc-link-search=native={}", build_dir.display());
        println!("cargo::rustc-link-lib=static=icedit_flashattn");
        println!("cargo::rustc-link-lib=dylib=cudart");
        println!("cargo::rustc-link-lib=dylib=stdc++");
    }
}
