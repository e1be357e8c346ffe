//! Finding, memory-mapping and reading weight files: [`TensorFiles`], the one reader of
//! safetensors and GGUF files (dense, FP8 or ggml blocks), and transformer checkpoints in either
//! layout: diffusers (`transformer/config.json` + `diffusion_pytorch_model*.safetensors`, maybe
//! sharded) or a BFL single file (`flux1-fill-dev.safetensors` or a community GGUF, fused qkv).
//! The model always asks for tensors by their diffusers names; a BFL checkpoint answers from its
//! fused tensors.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use memmap2::Mmap;

use crate::config::FluxConfig;
use crate::error::{FluxError, Result};
use crate::gguf::GgufValue;

/// Tensor names are diffusers'; BFL single files are read through [`bfl_source`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Diffusers,
    Bfl,
}

/// Prefix ComfyUI-style exports put before the BFL names; stripped on load.
const BFL_WRAPPED_PREFIX: &str = "model.diffusion_model.";

/// diffusers' weight files: `{stem}.safetensors` or `{stem}.safetensors.index.json`.
const DIFFUSERS_STEM: &str = "diffusion_pytorch_model";

/// How a tensor is stored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stored {
    /// Plain values (safetensors' F32/F16/BF16/F64, GGUF's F32/F16/BF16).
    Dense(DType),
    /// GGUF blocks, read as they are and multiplied dequantized.
    Quantized(GgmlDType),
    /// A safetensors dtype this loader cannot read (its name).
    Unsupported(&'static str),
}

struct TensorEntry {
    file: usize,
    stored: Stored,
    shape: Vec<usize>,
    /// Byte range of the data within the file's mapping.
    bytes: Range<usize>,
}

/// A set of memory-mapped weight files (safetensors, GGUF, or both) seen as one name -> tensor
/// map: the one place every model's weights are read from.
pub struct TensorFiles {
    paths: Vec<PathBuf>,
    maps: Vec<Mmap>,
    tensors: HashMap<String, TensorEntry>,
    /// Each GGUF file's metadata (`general.architecture`, ...), by file.
    gguf_metadata: Vec<Option<BTreeMap<String, GgufValue>>>,
    /// Each safetensors file's `__metadata__` (an adapter's rank, alpha, top-k), by file.
    safetensors_metadata: Vec<Option<HashMap<String, String>>>,
}

impl TensorFiles {
    /// Maps the files and reads their headers; the tensor data is only read on demand. A file
    /// starting with `GGUF` is read as GGUF, any other as safetensors.
    /// A tensor name found in two files is an error (a broken shard index).
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut maps = Vec::with_capacity(paths.len());
        let mut tensors = HashMap::new();
        let mut gguf_metadata = Vec::with_capacity(paths.len());
        let mut safetensors_metadata = Vec::with_capacity(paths.len());
        for (file, path) in paths.iter().enumerate() {
            let io_err = |source| FluxError::Io {
                path: path.clone(),
                source,
            };
            let handle = std::fs::File::open(path).map_err(io_err)?;
            // SAFETY: the file is opened read-only; as with every mmap, it must not be truncated
            // while the model loads.
            let mmap = unsafe { Mmap::map(&handle) }.map_err(io_err)?;
            let (entries, metadata, st_metadata) = if mmap.starts_with(b"GGUF") {
                let header = crate::gguf::parse(&mmap).map_err(|e| FluxError::Gguf {
                    path: path.clone(),
                    message: e.0,
                })?;
                let entries = header
                    .tensors
                    .into_iter()
                    .map(|t| {
                        let stored = match t.dtype {
                            GgmlDType::F32 => Stored::Dense(DType::F32),
                            GgmlDType::F16 => Stored::Dense(DType::F16),
                            GgmlDType::BF16 => Stored::Dense(DType::BF16),
                            q => Stored::Quantized(q),
                        };
                        let entry = TensorEntry {
                            file,
                            stored,
                            shape: t.shape,
                            bytes: t.bytes,
                        };
                        (t.name, entry)
                    })
                    .collect();
                (entries, Some(header.metadata), None)
            } else {
                let (entries, st_metadata) = safetensors_entries(path, &mmap, file)?;
                (entries, None, st_metadata)
            };
            for (name, entry) in entries {
                if let Some(previous) = tensors.insert(name.clone(), entry) {
                    return Err(FluxError::Safetensors {
                        path: path.clone(),
                        message: format!(
                            "tensor `{name}` is also in {}",
                            paths[previous.file].display()
                        ),
                    });
                }
            }
            maps.push(mmap);
            gguf_metadata.push(metadata);
            safetensors_metadata.push(st_metadata);
        }
        Ok(Self {
            paths: paths.to_vec(),
            maps,
            tensors,
            gguf_metadata,
            safetensors_metadata,
        })
    }

    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|e| e.shape.as_slice())
    }

    pub fn stored(&self, name: &str) -> Option<Stored> {
        self.tensors.get(name).map(|e| e.stored)
    }

    /// How the weights are stored, for recipes and reports: `safetensors BF16 x780` or
    /// `GGUF Q4_K x304, F32 x472, ...` (tensor counts by type, most common first).
    pub fn format_summary(&self) -> String {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for entry in self.tensors.values() {
            let name = match entry.stored {
                Stored::Dense(d) => d.as_str().to_uppercase(),
                Stored::Quantized(q) => crate::gguf::ggml_type_name(q).to_string(),
                Stored::Unsupported(s) => s.to_string(),
            };
            *counts.entry(name).or_default() += 1;
        }
        let mut counts: Vec<(String, usize)> = counts.into_iter().collect();
        counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let format = match self.gguf_metadata.iter().any(Option::is_some) {
            true => "GGUF",
            false => "safetensors",
        };
        let types: Vec<String> = counts.iter().map(|(t, n)| format!("{t} x{n}")).collect();
        format!("{format} {}", types.join(", "))
    }

    /// The `__metadata__` of the first safetensors file among them that has one.
    pub fn safetensors_metadata(&self) -> Option<&HashMap<String, String>> {
        self.safetensors_metadata.iter().flatten().next()
    }

    /// The metadata of the first GGUF file among them, if any.
    pub fn gguf_metadata(&self) -> Option<&BTreeMap<String, GgufValue>> {
        self.gguf_metadata.iter().flatten().next()
    }

    /// Reads `name` (only `rows` of its first dimension, if given) onto `device` as `dtype`;
    /// quantized tensors are dequantized (as ggml's `dequantize_row_*`, in f32).
    ///
    /// On Unix the pages read are then dropped from this process's resident set, so that
    /// loading never holds the mapped file and the loaded weights at the same time.
    pub fn read(
        &self,
        name: &str,
        rows: Option<Range<usize>>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let parts = rows.map(|r| vec![r]);
        self.read_parts(name, parts.as_deref(), dtype, device)
    }

    /// [`TensorFiles::read`] of the rows `parts` (in that order) of the first dimension.
    pub fn read_parts(
        &self,
        name: &str,
        parts: Option<&[Range<usize>]>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let entry = self.tensors.get(name).ok_or_else(|| self.missing(name))?;
        let (bytes, shape) = self.raw_rows(name, entry, parts)?;
        let tensor = match entry.stored {
            Stored::Dense(stored) => {
                let mut tensor = Tensor::from_raw_buffer(&bytes, stored, &shape, device)?;
                if stored == DType::F8E4M3 {
                    // Exact in f32; the checks and every op below want a dtype candle computes in.
                    tensor = tensor.to_dtype(DType::F32)?;
                }
                if !crate::finite::all_finite(&tensor)? {
                    return Err(self.non_finite(name, entry, stored, stored, true));
                }
                let converted = tensor.to_dtype(dtype)?;
                // A value beyond the dtype's range becomes infinite in the conversion.
                if stored != dtype && !crate::finite::all_finite(&converted)? {
                    return Err(self.non_finite(name, entry, stored, dtype, false));
                }
                converted
            }
            Stored::Quantized(q) => {
                let dequantized =
                    quantized_tensor(q, &bytes, &shape, &Device::Cpu)?.dequantize(&Device::Cpu)?;
                if !crate::finite::all_finite(&dequantized)? {
                    return Err(self.non_finite(name, entry, DType::F32, DType::F32, true));
                }
                let converted = dequantized.to_dtype(dtype)?.to_device(device)?;
                if dtype != DType::F32 && !crate::finite::all_finite(&converted)? {
                    return Err(self.non_finite(name, entry, DType::F32, dtype, false));
                }
                converted
            }
            Stored::Unsupported(stored) => {
                return Err(FluxError::UnsupportedTensorDtype {
                    name: name.to_string(),
                    dtype: stored.to_string(),
                })
            }
        };
        self.drop_pages(entry);
        Ok(tensor)
    }

    /// The rows `parts` of a quantized tensor as it is stored, on `device`; `None` when the
    /// tensor is stored dense (read it with [`TensorFiles::read_parts`]).
    pub fn read_quantized(
        &self,
        name: &str,
        parts: Option<&[Range<usize>]>,
        device: &Device,
    ) -> Result<Option<QTensor>> {
        let entry = self.tensors.get(name).ok_or_else(|| self.missing(name))?;
        let Stored::Quantized(q) = entry.stored else {
            return Ok(None);
        };
        let (bytes, shape) = self.raw_rows(name, entry, parts)?;
        // The block scales are f16: a NaN or infinite one spoils its whole block. Read from the
        // bytes (dequantizing a 12B model to check it took most of its load time).
        let finite = match crate::gguf::block_scales_finite(q, &bytes) {
            Some(finite) => finite,
            None => crate::finite::all_finite(
                &quantized_tensor(q, &bytes, &shape, &Device::Cpu)?.dequantize(&Device::Cpu)?,
            )?,
        };
        let tensor = quantized_tensor(q, &bytes, &shape, device)?;
        if !finite {
            return Err(self.non_finite(name, entry, DType::F32, DType::F32, true));
        }
        self.drop_pages(entry);
        Ok(Some(tensor))
    }

    /// The bytes of rows `parts` (all rows if `None`) and their shape.
    fn raw_rows(
        &self,
        name: &str,
        entry: &TensorEntry,
        parts: Option<&[Range<usize>]>,
    ) -> Result<(Cow<'_, [u8]>, Vec<usize>)> {
        let map = &self.maps[entry.file];
        let all = &map[entry.bytes.clone()];
        let Some(parts) = parts else {
            return Ok((Cow::Borrowed(all), entry.shape.clone()));
        };
        let rows = entry.shape.first().copied().unwrap_or(0);
        // A 1-D tensor's rows are single values: not whole blocks when quantized.
        if entry.shape.len() < 2 && matches!(entry.stored, Stored::Quantized(_)) {
            return Err(FluxError::Input(format!(
                "tensor `{name}` is 1-D and quantized: its rows cannot be read apart"
            )));
        }
        if let Some(bad) = parts.iter().find(|r| r.start > r.end || r.end > rows) {
            return Err(FluxError::Input(format!(
                "rows {bad:?} of tensor `{name}`, which has {rows}"
            )));
        }
        let row_bytes = all.len() / entry.shape[0].max(1);
        let mut shape = entry.shape.clone();
        shape[0] = parts.iter().map(|r| r.len()).sum();
        let bytes = match parts {
            [one] => Cow::Borrowed(&all[one.start * row_bytes..one.end * row_bytes]),
            many => Cow::Owned(
                many.iter()
                    .flat_map(|r| &all[r.start * row_bytes..r.end * row_bytes])
                    .copied()
                    .collect(),
            ),
        };
        Ok((bytes, shape))
    }

    fn drop_pages(&self, entry: &TensorEntry) {
        #[cfg(unix)]
        // SAFETY: the mapping is read-only and file-backed, and no slice of it outlives the copy
        // made when the tensor was built: dropped pages are read from the file again if touched.
        unsafe {
            let _ = self.maps[entry.file].unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                entry.bytes.start,
                entry.bytes.len(),
            );
        }
        #[cfg(not(unix))]
        let _ = entry;
    }

    fn non_finite(
        &self,
        name: &str,
        entry: &TensorEntry,
        stored: DType,
        dtype: DType,
        in_file: bool,
    ) -> FluxError {
        FluxError::NonFiniteWeight {
            name: name.to_string(),
            file: self.paths[entry.file].clone(),
            stored,
            dtype,
            in_file,
        }
    }

    fn missing(&self, name: &str) -> FluxError {
        FluxError::MissingTensor {
            name: name.to_string(),
            read_as: None,
            files: self.paths.clone(),
        }
    }
}

/// The tensor directory of a safetensors file, checked against the file's length.
/// The tensors of a safetensors file, and its `__metadata__`.
#[allow(clippy::type_complexity)]
fn safetensors_entries(
    path: &Path,
    mmap: &[u8],
    file: usize,
) -> Result<(Vec<(String, TensorEntry)>, Option<HashMap<String, String>>)> {
    let (header_len, metadata) =
        safetensors::SafeTensors::read_metadata(mmap).map_err(|e| FluxError::Safetensors {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    let data_start = 8 + header_len;
    let mut entries = Vec::new();
    for (name, info) in metadata.tensors() {
        // A tensor with no data can still claim dimensions whose product overflows
        // (e.g. [0, 2^32, 2^32]); candle's strides would overflow on it.
        if !shape_fits(&info.shape) {
            return Err(FluxError::Safetensors {
                path: path.to_path_buf(),
                message: format!("tensor `{name}` has the impossible shape {:?}", info.shape),
            });
        }
        let (begin, end) = info.data_offsets;
        let entry = TensorEntry {
            file,
            stored: stored_safetensors(info.dtype),
            shape: info.shape.clone(),
            bytes: data_start + begin..data_start + end,
        };
        if entry.bytes.end > mmap.len() {
            return Err(FluxError::Safetensors {
                path: path.to_path_buf(),
                message: format!(
                    "tensor `{name}` runs past the end of the file (truncated download?)"
                ),
            });
        }
        entries.push((name, entry));
    }
    Ok((entries, metadata.metadata().clone()))
}

fn stored_safetensors(dtype: safetensors::Dtype) -> Stored {
    use safetensors::Dtype as S;
    match dtype {
        S::F32 => Stored::Dense(DType::F32),
        S::F16 => Stored::Dense(DType::F16),
        S::BF16 => Stored::Dense(DType::BF16),
        S::F64 => Stored::Dense(DType::F64),
        S::F8_E4M3 => Stored::Dense(DType::F8E4M3),
        S::F8_E5M2 => Stored::Unsupported("F8_E5M2"),
        S::I8 => Stored::Unsupported("I8"),
        S::U8 => Stored::Unsupported("U8"),
        S::I16 => Stored::Unsupported("I16"),
        S::I32 => Stored::Unsupported("I32"),
        S::I64 => Stored::Unsupported("I64"),
        S::BOOL => Stored::Unsupported("BOOL"),
        _ => Stored::Unsupported("an unknown dtype"),
    }
}

/// A quantized tensor from its stored bytes (whole blocks, exactly `shape`'s worth).
fn quantized_tensor(
    dtype: GgmlDType,
    bytes: &[u8],
    shape: &[usize],
    device: &Device,
) -> Result<QTensor> {
    debug_assert_eq!(crate::gguf::tensor_bytes(dtype, shape), Some(bytes.len()));
    // candle reads the blocks in place: they must sit at an address their fields align to.
    if bytes.as_ptr() as usize % 8 == 0 {
        return Ok(qtensor_from_ggml(dtype, bytes, shape.to_vec(), device)?);
    }
    let mut aligned = vec![0u64; bytes.len().div_ceil(8)];
    // SAFETY: `aligned` has at least `bytes.len()` bytes, and u64 has no invalid bit patterns.
    let view =
        unsafe { std::slice::from_raw_parts_mut(aligned.as_mut_ptr() as *mut u8, bytes.len()) };
    view.copy_from_slice(bytes);
    Ok(qtensor_from_ggml(dtype, view, shape.to_vec(), device)?)
}

/// Where a diffusers-named tensor lives in a BFL checkpoint.
#[derive(Debug, Clone, PartialEq)]
enum Source {
    Whole(String),
    /// Rows `rows` of a fused tensor that has `total_rows` rows.
    Rows {
        name: String,
        rows: Range<usize>,
        total_rows: usize,
    },
    /// diffusers' `norm_out` chunks (scale, shift); BFL's final layer chunks (shift, scale).
    SwappedHalves(String),
}

impl Source {
    fn name(&self) -> &str {
        match self {
            Source::Whole(n) | Source::SwappedHalves(n) | Source::Rows { name: n, .. } => n,
        }
    }
}

/// Maps a diffusers tensor name onto the BFL checkpoint (../shared/SPEC.md section 3).
fn bfl_source(name: &str, cfg: &FluxConfig) -> Option<Source> {
    let (module, param) = name.rsplit_once('.')?;
    let h = cfg.hidden_size();
    let whole = |bfl_module: &str| Some(Source::Whole(format!("{bfl_module}.{param}")));
    let norm_scale = |bfl_module: &str| Some(Source::Whole(format!("{bfl_module}.scale")));
    let rows = |bfl_module: &str, part: usize, len: usize, total_rows: usize| {
        Some(Source::Rows {
            name: format!("{bfl_module}.{param}"),
            rows: part * h..part * h + len,
            total_rows,
        })
    };

    if let Some(rest) = module.strip_prefix("transformer_blocks.") {
        let (i, sub) = rest.split_once('.')?;
        let b = format!("double_blocks.{i}");
        return match sub {
            "norm1.linear" => whole(&format!("{b}.img_mod.lin")),
            "norm1_context.linear" => whole(&format!("{b}.txt_mod.lin")),
            "attn.to_q" => rows(&format!("{b}.img_attn.qkv"), 0, h, 3 * h),
            "attn.to_k" => rows(&format!("{b}.img_attn.qkv"), 1, h, 3 * h),
            "attn.to_v" => rows(&format!("{b}.img_attn.qkv"), 2, h, 3 * h),
            "attn.add_q_proj" => rows(&format!("{b}.txt_attn.qkv"), 0, h, 3 * h),
            "attn.add_k_proj" => rows(&format!("{b}.txt_attn.qkv"), 1, h, 3 * h),
            "attn.add_v_proj" => rows(&format!("{b}.txt_attn.qkv"), 2, h, 3 * h),
            "attn.norm_q" => norm_scale(&format!("{b}.img_attn.norm.query_norm")),
            "attn.norm_k" => norm_scale(&format!("{b}.img_attn.norm.key_norm")),
            "attn.norm_added_q" => norm_scale(&format!("{b}.txt_attn.norm.query_norm")),
            "attn.norm_added_k" => norm_scale(&format!("{b}.txt_attn.norm.key_norm")),
            "attn.to_out.0" => whole(&format!("{b}.img_attn.proj")),
            "attn.to_add_out" => whole(&format!("{b}.txt_attn.proj")),
            "ff.net.0.proj" => whole(&format!("{b}.img_mlp.0")),
            "ff.net.2" => whole(&format!("{b}.img_mlp.2")),
            "ff_context.net.0.proj" => whole(&format!("{b}.txt_mlp.0")),
            "ff_context.net.2" => whole(&format!("{b}.txt_mlp.2")),
            _ => None,
        };
    }
    if let Some(rest) = module.strip_prefix("single_transformer_blocks.") {
        let (i, sub) = rest.split_once('.')?;
        let b = format!("single_blocks.{i}");
        let fused_rows = 3 * h + cfg.mlp_hidden_size();
        return match sub {
            "attn.to_q" => rows(&format!("{b}.linear1"), 0, h, fused_rows),
            "attn.to_k" => rows(&format!("{b}.linear1"), 1, h, fused_rows),
            "attn.to_v" => rows(&format!("{b}.linear1"), 2, h, fused_rows),
            "proj_mlp" => rows(
                &format!("{b}.linear1"),
                3,
                cfg.mlp_hidden_size(),
                fused_rows,
            ),
            "proj_out" => whole(&format!("{b}.linear2")),
            "norm.linear" => whole(&format!("{b}.modulation.lin")),
            "attn.norm_q" => norm_scale(&format!("{b}.norm.query_norm")),
            "attn.norm_k" => norm_scale(&format!("{b}.norm.key_norm")),
            _ => None,
        };
    }
    match module {
        "x_embedder" => whole("img_in"),
        "context_embedder" => whole("txt_in"),
        "time_text_embed.timestep_embedder.linear_1" => whole("time_in.in_layer"),
        "time_text_embed.timestep_embedder.linear_2" => whole("time_in.out_layer"),
        "time_text_embed.text_embedder.linear_1" => whole("vector_in.in_layer"),
        "time_text_embed.text_embedder.linear_2" => whole("vector_in.out_layer"),
        "time_text_embed.guidance_embedder.linear_1" => whole("guidance_in.in_layer"),
        "time_text_embed.guidance_embedder.linear_2" => whole("guidance_in.out_layer"),
        "proj_out" => whole("final_layer.linear"),
        "norm_out.linear" => Some(Source::SwappedHalves(format!(
            "final_layer.adaLN_modulation.1.{param}"
        ))),
        _ => None,
    }
}

/// A piece of a BFL tensor made from a diffusers tensor (for writing BFL files).
pub(crate) struct BflPiece {
    pub name: String,
    /// Rows of the BFL tensor.
    pub rows: Range<usize>,
    /// Rows of the diffusers tensor.
    pub stored_rows: Range<usize>,
    /// Rows of the whole BFL tensor.
    pub total_rows: usize,
}

/// Where the diffusers tensor `name` (with `rows` rows) goes in a BFL checkpoint.
pub(crate) fn bfl_tensor_of(name: &str, rows: usize, cfg: &FluxConfig) -> Option<Vec<BflPiece>> {
    Some(match bfl_source(name, cfg)? {
        Source::Whole(n) => vec![BflPiece {
            name: n,
            rows: 0..rows,
            stored_rows: 0..rows,
            total_rows: rows,
        }],
        Source::Rows {
            name: n,
            rows: r,
            total_rows,
        } => vec![BflPiece {
            name: n,
            stored_rows: 0..r.len(),
            rows: r,
            total_rows,
        }],
        Source::SwappedHalves(n) => {
            let half = rows / 2;
            vec![
                BflPiece {
                    name: n.clone(),
                    rows: 0..half,
                    stored_rows: half..rows,
                    total_rows: rows,
                },
                BflPiece {
                    name: n,
                    rows: half..rows,
                    stored_rows: 0..half,
                    total_rows: rows,
                },
            ]
        }
    })
}

/// How one diffusers linear layer is stored in BFL naming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BflPart {
    /// The whole BFL module.
    Whole,
    /// Rows `rows` of a fused module with `total_rows` rows (qkv, single-block `linear1`).
    Rows {
        rows: Range<usize>,
        total_rows: usize,
    },
    /// The BFL module with its two output halves swapped (the final layer's modulation).
    SwappedHalves,
}

/// The BFL module (e.g. `double_blocks.0.img_attn.qkv`) holding the diffusers linear layer
/// `module` (e.g. `transformer_blocks.0.attn.to_q`), for adapters named after BFL modules.
pub fn bfl_linear(module: &str, cfg: &FluxConfig) -> Option<(String, BflPart)> {
    let source = bfl_source(&format!("{module}.weight"), cfg)?;
    let bfl_module = source.name().strip_suffix(".weight")?.to_string();
    let part = match source {
        Source::Whole(_) => BflPart::Whole,
        Source::Rows {
            rows, total_rows, ..
        } => BflPart::Rows { rows, total_rows },
        Source::SwappedHalves(_) => BflPart::SwappedHalves,
    };
    Some((bfl_module, part))
}

/// A located, opened transformer checkpoint with its config.
pub struct Checkpoint {
    files: TensorFiles,
    layout: Layout,
    /// Prefix to put before a BFL name to find it in the files.
    bfl_prefix: &'static str,
    config: FluxConfig,
    used: Mutex<HashSet<String>>,
}

impl Checkpoint {
    /// Opens a transformer from any of:
    /// - a diffusers pipeline folder (uses its `transformer/` subfolder),
    /// - a diffusers transformer folder (`config.json` + `diffusion_pytorch_model*.safetensors`),
    /// - a single `.safetensors` file in BFL or diffusers naming; its config is inferred from
    ///   the tensor shapes (see [`Checkpoint::open_with_config`] to give one).
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_inner(path, None)
    }

    /// Like [`Checkpoint::open`], with the config given rather than read or inferred.
    pub fn open_with_config(path: &Path, config: FluxConfig) -> Result<Self> {
        config.validate()?;
        Self::open_inner(path, Some(config))
    }

    fn open_inner(path: &Path, config: Option<FluxConfig>) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|source| FluxError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if meta.is_dir() {
            let dir = if path.join("transformer").is_dir() {
                path.join("transformer")
            } else {
                path.to_path_buf()
            };
            let config = match config {
                Some(c) => c,
                None => {
                    let config_path = dir.join("config.json");
                    if !config_path.is_file() {
                        return Err(FluxError::Config {
                            path: Some(config_path),
                            message: "missing: a diffusers transformer folder needs config.json \
                                      next to its safetensors files"
                                .into(),
                        });
                    }
                    FluxConfig::from_json_file(&config_path)?
                }
            };
            let files = TensorFiles::open(&diffusers_weight_files(&dir)?)?;
            Ok(Self::new(files, config, Layout::Diffusers, ""))
        } else {
            let files = TensorFiles::open(&[path.to_path_buf()])?;
            check_gguf_architecture(&files, path)?;
            let (layout, prefix) = detect_layout(&files).ok_or_else(|| FluxError::Config {
                path: Some(path.to_path_buf()),
                message: "no FLUX transformer tensors found (expected `double_blocks.*` from BFL \
                          or `transformer_blocks.*` from diffusers)"
                    .into(),
            })?;
            let config = match config {
                Some(c) => {
                    check_embedder(&files, layout, prefix, &c, path)?;
                    c
                }
                None => infer_config(&files, layout, prefix).map_err(|e| match e {
                    FluxError::Config { message, .. } => FluxError::Config {
                        path: Some(path.to_path_buf()),
                        message,
                    },
                    other => other,
                })?,
            };
            Ok(Self::new(files, config, layout, prefix))
        }
    }

    fn new(
        files: TensorFiles,
        config: FluxConfig,
        layout: Layout,
        bfl_prefix: &'static str,
    ) -> Self {
        Self {
            files,
            layout,
            bfl_prefix,
            config,
            used: Mutex::new(HashSet::new()),
        }
    }

    pub fn config(&self) -> &FluxConfig {
        &self.config
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The prefix before the BFL names in the files (`model.diffusion_model.` or none).
    pub fn bfl_prefix(&self) -> &str {
        self.bfl_prefix
    }

    /// Rows `rows` of a tensor under its stored name, with its scaled-FP8 scale applied.
    pub fn read_stored(
        &self,
        stored: &str,
        rows: Range<usize>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        self.read_scaled(stored, Some(&[rows]), dtype, device)
    }

    pub fn files(&self) -> &TensorFiles {
        &self.files
    }

    /// A `VarBuilder` that serves diffusers-named tensors from this checkpoint.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'_> {
        VarBuilder::from_backend(Box::new(CheckpointBackend(self)), dtype, device.clone())
    }

    /// Tensors of the checkpoint that the model did not read (after loading): a sign of a
    /// checkpoint made for another model.
    pub fn unused_tensors(&self) -> Vec<String> {
        let used = self.used.lock().expect("poisoned");
        // ComfyUI's scaled-FP8 marker and the input scales of FP8 matmuls: nothing to load.
        let fp8_extra = |n: &str| n.ends_with("scaled_fp8") || n.ends_with(".scale_input");
        let mut unused: Vec<String> = self
            .files
            .names()
            .filter(|n| !used.contains(*n) && !fp8_extra(n))
            .map(str::to_string)
            .collect();
        unused.sort();
        unused
    }

    fn missing(&self, stored: &str, name: &str) -> FluxError {
        FluxError::MissingTensor {
            name: stored.to_string(),
            read_as: (stored != name).then(|| name.to_string()),
            files: self.files.paths().to_vec(),
        }
    }

    fn source(&self, name: &str) -> Option<Source> {
        match self.layout {
            Layout::Diffusers => Some(Source::Whole(name.to_string())),
            Layout::Bfl => bfl_source(name, &self.config).map(|s| match s {
                Source::Whole(n) => Source::Whole(format!("{}{n}", self.bfl_prefix)),
                Source::SwappedHalves(n) => {
                    Source::SwappedHalves(format!("{}{n}", self.bfl_prefix))
                }
                Source::Rows {
                    name,
                    rows,
                    total_rows,
                } => Source::Rows {
                    name: format!("{}{name}", self.bfl_prefix),
                    rows,
                    total_rows,
                },
            }),
        }
    }

    /// Finds the tensor the model knows as `name`, checking it has `expected` shape: its stored
    /// name and which of its rows make it (`None`: all, in order).
    fn locate(&self, name: &str, expected: &Shape) -> Result<(String, Option<Vec<Range<usize>>>)> {
        let source = self.source(name).ok_or_else(|| self.missing(name, name))?;
        let stored = source.name();
        let read_as = (stored != name).then(|| name.to_string());
        let found = self
            .files
            .shape(stored)
            .ok_or_else(|| self.missing(stored, name))?
            .to_vec();
        self.used
            .lock()
            .expect("poisoned")
            .insert(stored.to_string());
        // A fused tensor must hold exactly the parts the config implies.
        let want = match &source {
            Source::Rows { total_rows, .. } => {
                let mut fused = expected.dims().to_vec();
                fused[0] = *total_rows;
                fused
            }
            _ => expected.dims().to_vec(),
        };
        if found != want {
            return Err(FluxError::ShapeMismatch {
                name: stored.to_string(),
                read_as,
                expected: want,
                found,
            });
        }
        Ok(match source {
            Source::Whole(n) => (n, None),
            Source::Rows { name: n, rows, .. } => (n, Some(vec![rows])),
            Source::SwappedHalves(n) => {
                let half = found[0] / 2;
                (n, Some(vec![half..2 * half, 0..half]))
            }
        })
    }

    /// Reads the tensor the model knows as `name`, checking it has `expected` shape.
    fn read(&self, name: &str, expected: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
        let (stored, parts) = self.locate(name, expected)?;
        self.read_scaled(&stored, parts.as_deref(), dtype, device)
    }

    /// Rows `parts` of the stored tensor `stored`; ComfyUI's scaled FP8 weights are
    /// `stored * scale_weight`, upcast first.
    fn read_scaled(
        &self,
        stored: &str,
        parts: Option<&[Range<usize>]>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let Some(scale) = self.weight_scale(stored, device)? else {
            return self.files.read_parts(stored, parts, dtype, device);
        };
        let weight = self
            .files
            .read_parts(stored, parts, DType::F32, device)?
            .broadcast_mul(&scale)?
            .to_dtype(dtype)?;
        if !crate::finite::all_finite(&weight)? {
            return Err(FluxError::NonFiniteValues {
                stage: format!("scaling `{stored}` by its `scale_weight`"),
                dtype,
            });
        }
        Ok(weight)
    }

    /// The per-tensor scale of a scaled-FP8 weight (`<module>.scale_weight`, one f32), if the
    /// checkpoint has one for `stored`.
    fn weight_scale(&self, stored: &str, device: &Device) -> Result<Option<Tensor>> {
        let Some(module) = stored.strip_suffix(".weight") else {
            return Ok(None);
        };
        let name = format!("{module}.scale_weight");
        let Some(shape) = self.files.shape(&name) else {
            return Ok(None);
        };
        if shape.iter().product::<usize>() != 1 {
            return Err(FluxError::ShapeMismatch {
                name,
                read_as: None,
                expected: vec![],
                found: shape.to_vec(),
            });
        }
        self.used.lock().expect("poisoned").insert(name.clone());
        let scale = self
            .files
            .read(&name, None, DType::F32, device)?
            .flatten_all()?;
        Ok(Some(scale))
    }

    /// The tensor the model knows as `name` as the file stores it when that is quantized (GGUF
    /// blocks stay blocks, on `device`), else `None`.
    pub fn read_quantized(
        &self,
        name: &str,
        expected: &Shape,
        device: &Device,
    ) -> Result<Option<QTensor>> {
        let (stored, parts) = self.locate(name, expected)?;
        self.files.read_quantized(&stored, parts.as_deref(), device)
    }
}

struct CheckpointBackend<'a>(&'a Checkpoint);

impl candle_nn::var_builder::SimpleBackend for CheckpointBackend<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0
            .read(name, &s, dtype, dev)
            .map_err(FluxError::into_candle)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let source = self
            .0
            .source(name)
            .ok_or_else(|| self.0.missing(name, name).into_candle())?;
        let shape = self
            .0
            .files
            .shape(source.name())
            .map(|s| s.to_vec())
            .unwrap_or_default();
        self.get(
            Shape::from(shape),
            name,
            candle_nn::Init::Const(0.),
            dtype,
            dev,
        )
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0
            .source(name)
            .is_some_and(|s| self.0.files.contains(s.name()))
    }
}

/// Maps a model's tensor name to its name in the files.
type Rename = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// A set of safetensors files read under another model's tensor names: `rename` maps each name
/// the model asks for to the name stored in the files (`None`: no such tensor there). A stored
/// tensor may differ from the requested shape by trailing 1-sized dimensions only (a 1x1 conv
/// weight `[o, i, 1, 1]` read as a linear weight `[o, i]`, or back); it is reshaped on read.
pub struct MappedTensors {
    files: TensorFiles,
    rename: Rename,
    used: Mutex<HashSet<String>>,
}

impl MappedTensors {
    pub fn new(
        files: TensorFiles,
        rename: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        Self {
            files,
            rename: Box::new(rename),
            used: Mutex::new(HashSet::new()),
        }
    }

    /// The files read under their own names.
    pub fn identity(files: TensorFiles) -> Self {
        Self::new(files, |name| Some(name.to_string()))
    }

    pub fn files(&self) -> &TensorFiles {
        &self.files
    }

    /// The stored name of the model's tensor `name`.
    pub fn stored_name(&self, name: &str) -> Option<String> {
        (self.rename)(name)
    }

    /// Whether the model's tensor `name` is in the files.
    pub fn contains(&self, name: &str) -> bool {
        self.shape(name).is_some()
    }

    /// The stored shape of the model's tensor `name`.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.files.shape(&self.stored_name(name)?)
    }

    /// A `VarBuilder` that serves the model's tensor names from the files.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'_> {
        VarBuilder::from_backend(Box::new(MappedBackend(self)), dtype, device.clone())
    }

    /// Stored tensors the model did not read (after loading), sorted.
    pub fn unused_tensors(&self) -> Vec<String> {
        let used = self.used.lock().expect("poisoned");
        let mut unused: Vec<String> = self
            .files
            .names()
            .filter(|n| !used.contains(*n))
            .map(str::to_string)
            .collect();
        unused.sort();
        unused
    }

    fn missing(&self, stored: &str, name: &str) -> FluxError {
        FluxError::MissingTensor {
            name: stored.to_string(),
            read_as: (stored != name).then(|| name.to_string()),
            files: self.files.paths().to_vec(),
        }
    }

    fn read(&self, name: &str, expected: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
        let stored = self
            .stored_name(name)
            .ok_or_else(|| self.missing(name, name))?;
        let found = self
            .files
            .shape(&stored)
            .ok_or_else(|| self.missing(&stored, name))?
            .to_vec();
        self.used.lock().expect("poisoned").insert(stored.clone());
        let trim = |dims: &[usize]| -> Vec<usize> {
            let keep = dims.iter().rposition(|&d| d != 1).map_or(0, |i| i + 1);
            dims[..keep].to_vec()
        };
        if found != expected.dims() && trim(&found) != trim(expected.dims()) {
            return Err(FluxError::ShapeMismatch {
                read_as: (stored != name).then(|| name.to_string()),
                name: stored,
                expected: expected.dims().to_vec(),
                found,
            });
        }
        let tensor = self.files.read(&stored, None, dtype, device)?;
        if found == expected.dims() {
            Ok(tensor)
        } else {
            Ok(tensor.reshape(expected)?)
        }
    }
}

struct MappedBackend<'a>(&'a MappedTensors);

impl candle_nn::var_builder::SimpleBackend for MappedBackend<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0
            .read(name, &s, dtype, dev)
            .map_err(FluxError::into_candle)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let shape = self
            .0
            .shape(name)
            .map(<[usize]>::to_vec)
            .unwrap_or_default();
        self.get(
            Shape::from(shape),
            name,
            candle_nn::Init::Const(0.),
            dtype,
            dev,
        )
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}

/// Whether a shape's element count (and so every stride) fits in a `usize`.
pub fn shape_fits(shape: &[usize]) -> bool {
    shape
        .iter()
        .rev()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .is_some()
}

/// The safetensors files of a diffusers model folder (`diffusion_pytorch_model`).
pub(crate) fn diffusers_weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(SafetensorsSet::open(dir, DIFFUSERS_STEM, Sharding::IndexFirst)?.files)
}

/// Which of `{stem}.safetensors` and its shard index a folder holding both is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharding {
    /// diffusers' order.
    IndexFirst,
    /// transformers' order.
    SingleFirst,
}

/// The weight files of a model folder: `{stem}.safetensors`, or the shards that
/// `{stem}.safetensors.index.json` names. The one reader of shard indexes for local folders
/// (the Hub crate reads them to know what to download).
#[derive(Debug, Clone)]
pub struct SafetensorsSet {
    /// Distinct, sorted.
    pub files: Vec<PathBuf>,
    /// Each tensor's shard, as the index lists it (empty for a single file).
    pub shard_of: HashMap<String, PathBuf>,
}

impl SafetensorsSet {
    pub fn open(dir: &Path, stem: &str, order: Sharding) -> Result<Self> {
        let single = dir.join(format!("{stem}.safetensors"));
        let index = dir.join(format!("{stem}.safetensors.index.json"));
        let use_index = match order {
            Sharding::IndexFirst => index.is_file(),
            Sharding::SingleFirst => !single.is_file() && index.is_file(),
        };
        if !use_index {
            if single.is_file() {
                return Ok(Self {
                    files: vec![single],
                    shard_of: HashMap::new(),
                });
            }
            return Err(FluxError::MissingWeights {
                what: "model weights",
                path: single,
                hint: format!(
                    "expected {stem}.safetensors, or {stem}.safetensors.index.json with its shards"
                ),
            });
        }
        let text = crate::files::read_text_file(&index, crate::files::MAX_CONFIG_BYTES).map_err(
            |source| FluxError::Io {
                path: index.clone(),
                source,
            },
        )?;
        let bad_index = |message: String| FluxError::Safetensors {
            path: index.clone(),
            message: format!("bad shard index: {message}"),
        };
        #[derive(serde::Deserialize)]
        struct ShardIndex {
            weight_map: HashMap<String, String>,
        }
        let parsed: ShardIndex =
            serde_json::from_str(&text).map_err(|e| bad_index(e.to_string()))?;
        let shards: BTreeSet<&str> = parsed.weight_map.values().map(String::as_str).collect();
        if shards.is_empty() {
            return Err(bad_index("its weight_map is empty".into()));
        }
        // Shards are files beside the index: a path out of the folder is not one.
        if let Some(bad) = shards
            .iter()
            .find(|s| s.is_empty() || s.contains(['/', '\\']) || **s == ".." || **s == ".")
        {
            return Err(bad_index(format!(
                "the shard name {bad:?} is not a file name in the model folder"
            )));
        }
        let files: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
        if let Some(missing) = files.iter().find(|p| !p.is_file()) {
            return Err(FluxError::MissingWeights {
                what: "weight shard",
                path: missing.clone(),
                hint: format!(
                    "listed in {}; the download may be incomplete",
                    index.display()
                ),
            });
        }
        let shard_of = parsed
            .weight_map
            .into_iter()
            .map(|(tensor, file)| (tensor, dir.join(file)))
            .collect();
        Ok(Self { files, shard_of })
    }
}

/// A single file given with a config (a pipeline's `transformer/config.json`) must be for that
/// model: its input embedder says which (FLUX.1 dev and Kontext take 64 input channels, Fill
/// 384) and how wide. Checked before anything loads, so the error names the real mismatch.
fn check_embedder(
    files: &TensorFiles,
    layout: Layout,
    prefix: &str,
    config: &FluxConfig,
    path: &Path,
) -> Result<()> {
    let name = match layout {
        Layout::Bfl => format!("{prefix}img_in.weight"),
        Layout::Diffusers => format!("{prefix}x_embedder.weight"),
    };
    let Some(shape) = files.shape(&name) else {
        return Ok(()); // reported as missing when the model loads
    };
    let expected = [config.hidden_size(), config.in_channels];
    if shape != expected {
        let found = match shape {
            [width, inputs] => format!("{inputs} input channels and width {width}"),
            other => format!("the shape {other:?}"),
        };
        return Err(FluxError::Config {
            path: Some(path.to_path_buf()),
            message: format!(
                "this transformer is for another model: its `{name}` has {found}, the \
                 pipeline's config wants {} input channels and width {} (FLUX.1 dev and Kontext \
                 take 64 input channels, FLUX.1 Fill 384); give the transformer file made for \
                 this pipeline",
                expected[1], expected[0]
            ),
        });
    }
    Ok(())
}

/// A GGUF names its model in `general.architecture` (ComfyUI-GGUF's FLUX files say `flux`);
/// a T5 encoder or an LLM given as the transformer is refused by it, before any shape.
fn check_gguf_architecture(files: &TensorFiles, path: &Path) -> Result<()> {
    let architecture = files
        .gguf_metadata()
        .and_then(|m| m.get("general.architecture"));
    match architecture {
        None => Ok(()),
        Some(value) if value.as_str() == Some("flux") => Ok(()),
        Some(value) => Err(FluxError::Config {
            path: Some(path.to_path_buf()),
            message: format!(
                "this GGUF's `general.architecture` is {}, not `flux`: it holds another model \
                 than a FLUX transformer",
                match value.as_str() {
                    Some(s) => format!("`{s}`"),
                    None => format!("{value:?}"),
                }
            ),
        }),
    }
}

fn detect_layout(files: &TensorFiles) -> Option<(Layout, &'static str)> {
    let has_prefix = |p: &str| files.names().any(|n| n.starts_with(p));
    if has_prefix(&format!("{BFL_WRAPPED_PREFIX}double_blocks.")) {
        Some((Layout::Bfl, BFL_WRAPPED_PREFIX))
    } else if has_prefix("double_blocks.") || has_prefix("single_blocks.") {
        Some((Layout::Bfl, ""))
    } else if has_prefix("transformer_blocks.") || has_prefix("single_transformer_blocks.") {
        Some((Layout::Diffusers, ""))
    } else {
        None
    }
}

/// Reads the config off the tensor shapes of a single-file checkpoint. The RoPE axes cannot be
/// seen in the weights: FLUX's (16, 56, 56) is assumed for its 128-wide heads, any other head
/// size needs an explicit config.
fn infer_config(files: &TensorFiles, layout: Layout, prefix: &str) -> Result<FluxConfig> {
    let (double, single, img_in, out, txt_in, vec_in, guidance, q_norm) = match layout {
        Layout::Bfl => (
            "double_blocks.",
            "single_blocks.",
            "img_in.weight",
            "final_layer.linear.weight",
            "txt_in.weight",
            "vector_in.in_layer.weight",
            "guidance_in.in_layer.weight",
            "double_blocks.0.img_attn.norm.query_norm.scale",
        ),
        Layout::Diffusers => (
            "transformer_blocks.",
            "single_transformer_blocks.",
            "x_embedder.weight",
            "proj_out.weight",
            "context_embedder.weight",
            "time_text_embed.text_embedder.linear_1.weight",
            "time_text_embed.guidance_embedder.linear_1.weight",
            "transformer_blocks.0.attn.norm_q.weight",
        ),
    };
    let shape = |name: &str| -> Result<Vec<usize>> {
        let full = format!("{prefix}{name}");
        files
            .shape(&full)
            .map(<[usize]>::to_vec)
            .ok_or_else(|| files.missing(&full))
    };
    let count_blocks = |block_prefix: &str| {
        let full = format!("{prefix}{block_prefix}");
        files
            .names()
            .filter_map(|n| n.strip_prefix(full.as_str()))
            .filter_map(|rest| rest.split('.').next()?.parse::<usize>().ok())
            .max()
            .map_or(0, |max| max + 1)
    };
    // The tensors' ranks are checked before any dimension is read.
    let dims = |name: &str, rank: usize| -> Result<Vec<usize>> {
        let dims = shape(name)?;
        if dims.len() != rank {
            return Err(FluxError::Config {
                path: None,
                message: format!(
                    "`{prefix}{name}` has shape {dims:?}; a FLUX transformer's has {rank} \
                     dimension(s)"
                ),
            });
        }
        Ok(dims)
    };
    let img_in = dims(img_in, 2)?;
    let head_dim = dims(q_norm, 1)?[0];
    let hidden = img_in[0];
    if head_dim == 0 || hidden % head_dim != 0 {
        return Err(FluxError::Config {
            path: None,
            message: format!("hidden size {hidden} is not a multiple of the head size {head_dim}"),
        });
    }
    if head_dim != 128 {
        return Err(FluxError::Config {
            path: None,
            message: format!(
                "attention head size is {head_dim}, not FLUX's 128, so the RoPE axes cannot be \
                 inferred; pass the transformer's config.json"
            ),
        });
    }
    let config = FluxConfig {
        patch_size: 1,
        in_channels: img_in[1],
        out_channels: Some(dims(out, 2)?[0]),
        num_layers: count_blocks(double),
        num_single_layers: count_blocks(single),
        attention_head_dim: head_dim,
        num_attention_heads: hidden / head_dim,
        joint_attention_dim: dims(txt_in, 2)?[1],
        pooled_projection_dim: dims(vec_in, 2)?[1],
        guidance_embeds: files.contains(&format!("{prefix}{guidance}")),
        axes_dims_rope: vec![16, 56, 56],
    };
    config.validate()?;
    Ok(config)
}

/// Parses a user's dtype name; only the float types the model runs in are accepted.
pub fn parse_dtype(name: &str) -> Result<DType> {
    match name.to_ascii_lowercase().as_str() {
        "f32" | "fp32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "fp16" | "float16" => Ok(DType::F16),
        _ => Err(FluxError::UnsupportedDtype {
            requested: name.to_string(),
        }),
    }
}

/// The model computes in f32, bf16 or f16 only.
pub fn check_model_dtype(dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::BF16 | DType::F16 => Ok(()),
        other => Err(FluxError::UnsupportedDtype {
            requested: other.as_str().to_string(),
        }),
    }
}

/// What a model reads its layers from: a `VarBuilder` for dense tensors and, when loading a
/// checkpoint, that checkpoint, whose quantized linear weights stay quantized.
#[derive(Clone)]
pub struct WeightSource<'a> {
    vb: VarBuilder<'a>,
    checkpoint: Option<&'a Checkpoint>,
    /// Dense linear weights of the checkpoint quantized to this type as they load.
    quantize: Option<GgmlDType>,
}

impl<'a> From<VarBuilder<'a>> for WeightSource<'a> {
    fn from(vb: VarBuilder<'a>) -> Self {
        Self {
            vb,
            checkpoint: None,
            quantize: None,
        }
    }
}

impl<'a> WeightSource<'a> {
    /// Dense tensors as `dtype` on `device`, quantized linears as stored.
    pub fn checkpoint(checkpoint: &'a Checkpoint, dtype: DType, device: &Device) -> Self {
        Self {
            vb: checkpoint.var_builder(dtype, device),
            checkpoint: Some(checkpoint),
            quantize: None,
        }
    }

    /// The checkpoint's dense linear weights quantized to `dtype` as they load, each to the
    /// type `icedit quantize --type` gives it (the input embedders and final layer F16, widths
    /// that are not whole blocks Q8_0 or F16), so that the layers equal those of the GGUF file
    /// `icedit quantize` writes. Weights the checkpoint stores quantized stay as they are.
    pub fn quantized_at_load(mut self, dtype: Option<GgmlDType>) -> Self {
        self.quantize = dtype;
        self
    }

    pub fn pp(&self, name: impl ToString) -> Self {
        Self {
            vb: self.vb.pp(name),
            checkpoint: self.checkpoint,
            quantize: self.quantize,
        }
    }

    pub fn get(&self, shape: impl Into<Shape>, name: &str) -> candle_core::Result<Tensor> {
        self.vb.get(shape, name)
    }

    /// The module path `pp` has led to.
    pub fn path(&self) -> String {
        self.vb.prefix()
    }

    pub fn dtype(&self) -> DType {
        self.vb.dtype()
    }

    pub fn device(&self) -> &Device {
        self.vb.device()
    }

    /// The quantized `weight` of this module `[out, in]`, if the checkpoint stores it so.
    pub(crate) fn quantized_weight(
        &self,
        out_features: usize,
        in_features: usize,
    ) -> candle_core::Result<Option<QTensor>> {
        let Some(checkpoint) = self.checkpoint else {
            return Ok(None);
        };
        let module = self.vb.prefix();
        let name = crate::linear::join(&module, "weight");
        let shape = Shape::from((out_features, in_features));
        let stored = checkpoint
            .read_quantized(&name, &shape, self.device())
            .map_err(FluxError::into_candle)?;
        let Some(dtype) = self
            .type_at_load(out_features, in_features)
            .filter(|_| stored.is_none())
        else {
            return Ok(stored);
        };
        if float_of(dtype).is_some() {
            return Ok(None); // read dense by `dense_weight`, rounded there
        }
        let weight = checkpoint
            .var_builder(DType::F32, &Device::Cpu)
            .pp(self.vb.prefix())
            .get(shape, "weight")?;
        crate::quantize::quantize_rows(&weight, dtype, self.device()).map(Some)
    }

    /// A dense linear `weight` `[out, in]`, rounded through the type it is quantized to at load
    /// when that is a float type (F16 for the embedders and final layer, as in the GGUF file).
    pub(crate) fn dense_weight(
        &self,
        out_features: usize,
        in_features: usize,
    ) -> candle_core::Result<Tensor> {
        let weight = self.get((out_features, in_features), "weight")?;
        match self
            .type_at_load(out_features, in_features)
            .and_then(float_of)
        {
            Some(float) if float != weight.dtype() && float != DType::F32 => {
                weight.to_dtype(float)?.to_dtype(weight.dtype())
            }
            _ => Ok(weight),
        }
    }

    /// The type `icedit quantize` gives the BFL tensor this module is (part of), when the
    /// source quantizes at load. Rows are quantized independently, so a part of a fused BFL
    /// tensor quantizes alike.
    fn type_at_load(&self, out_features: usize, in_features: usize) -> Option<GgmlDType> {
        let (asked, checkpoint) = (self.quantize?, self.checkpoint?);
        let module = self.vb.prefix();
        let bfl = bfl_linear(&module, checkpoint.config()).map_or(module, |(bfl, _)| bfl);
        Some(crate::quantize::tensor_type(
            &format!("{bfl}.weight"),
            &[out_features, in_features],
            asked,
        ))
    }
}

/// The candle dtype of a float ggml type.
fn float_of(dtype: GgmlDType) -> Option<DType> {
    match dtype {
        GgmlDType::F32 => Some(DType::F32),
        GgmlDType::F16 => Some(DType::F16),
        GgmlDType::BF16 => Some(DType::BF16),
        _ => None,
    }
}
