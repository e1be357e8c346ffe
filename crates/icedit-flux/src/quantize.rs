//! Writing a transformer checkpoint as GGUF in BFL naming, the layout the community's FLUX files
//! have (ComfyUI-GGUF, diffusers' `from_single_file`). One tensor is read, quantized and written
//! at a time, so memory stays at one tensor whatever the model's size; the file appears only
//! when complete (written beside it, then renamed).

use std::collections::BTreeMap;
use std::io::{BufWriter, Seek, Write};
use std::ops::Range;
use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::error::{FluxError, Result};
use crate::gguf::{ggml_id, ggml_type_name, tensor_bytes};
use crate::weights::{bfl_linear, bfl_tensor_of, BflPart, BflPiece, Checkpoint, Layout};

const ALIGNMENT: usize = 32;

/// The BFL modules kept at F16 whatever the type asked, as community files keep them: the input
/// embedders and the final layer are small and sensitive.
const KEPT_HIGH: [&str; 6] = [
    "img_in.",
    "txt_in.",
    "time_in.",
    "vector_in.",
    "guidance_in.",
    "final_layer.",
];

/// `values` (`[rows, cols]`, f32, on the CPU) quantized to `dtype` on `device`: bands of rows
/// quantized on all cores (candle's quantizer is single-threaded; a 12B model took minutes).
/// ggml quantizes each row on its own, so the blocks are those of one whole-tensor call.
pub(crate) fn quantize_rows(
    values: &Tensor,
    dtype: GgmlDType,
    device: &Device,
) -> candle_core::Result<QTensor> {
    use rayon::prelude::*;
    if values.rank() != 2 || matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
        return QTensor::quantize_onto(values, dtype, device);
    }
    let rows = values.dim(0)?;
    let band = rows.div_ceil(4 * rayon::current_num_threads()).max(1);
    let starts: Vec<usize> = (0..rows).step_by(band).collect();
    let bands = starts
        .par_iter()
        .map(|&start| {
            // Its own storage: candle's quantizer reads a tensor's whole storage, not a view's
            // window of it (and `copy` keeps the window).
            let len = band.min(rows - start);
            let window = values
                .narrow(0, start, len)?
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let part = Tensor::from_vec(window, (len, values.dim(1)?), &Device::Cpu)?;
            Ok(QTensor::quantize(&part, dtype)?.data()?.into_owned())
        })
        .collect::<candle_core::Result<Vec<Vec<u8>>>>()?;
    let storage = candle_core::quantized::QStorage::from_data(
        std::borrow::Cow::Owned(bands.concat()),
        device,
        dtype,
    )?;
    QTensor::new(storage, values.shape().clone())
}

/// ggml's `general.file_type` ids (llama.cpp's `LLAMA_FTYPE_MOSTLY_*`).
fn file_type(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q8_0 => 7,
        GgmlDType::Q5_0 => 8,
        GgmlDType::Q5_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 12, // Q3_K_M
        GgmlDType::Q4K => 15, // Q4_K_M
        GgmlDType::Q5K => 17, // Q5_K_M
        GgmlDType::Q6K => 18,
        GgmlDType::BF16 => 32,
        GgmlDType::Q8_1 | GgmlDType::Q8K => 1024,
    }
}

/// The types `icedit quantize --type` offers.
const WRITABLE: [GgmlDType; 13] = [
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q8_0,
    GgmlDType::Q6K,
    GgmlDType::Q5K,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q4K,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q3K,
    GgmlDType::Q2K,
];

/// A writable type by its ggml name (`q4_k`, `Q8_0`, `bf16`).
pub fn parse_quant_type(name: &str) -> Option<GgmlDType> {
    WRITABLE
        .into_iter()
        .find(|t| ggml_type_name(*t).eq_ignore_ascii_case(name))
}

/// One tensor of the file to write.
struct Planned {
    name: String,
    shape: Vec<usize>,
    dtype: GgmlDType,
    /// Where its values come from in the checkpoint.
    parts: Vec<Part>,
}

/// Rows of the BFL tensor read from rows of one stored tensor.
#[derive(Clone)]
struct Part {
    stored: String,
    stored_rows: Range<usize>,
    /// Rows of the BFL tensor this part fills.
    rows: Range<usize>,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct QuantizeSummary {
    pub tensors: usize,
    pub bytes: u64,
    /// Tensor counts by ggml type name.
    pub types: BTreeMap<&'static str, usize>,
}

/// The type a BFL tensor gets: 1-D tensors F32; the kept modules F16; the rest `dtype` when
/// their rows are whole blocks of it, else Q8_0 when they are of that, else F16.
pub(crate) fn tensor_type(name: &str, shape: &[usize], dtype: GgmlDType) -> GgmlDType {
    if shape.len() < 2 {
        return GgmlDType::F32;
    }
    if KEPT_HIGH.iter().any(|m| name.starts_with(m)) {
        // Never more precision than asked, never less than F16.
        return if dtype == GgmlDType::F32 {
            GgmlDType::F32
        } else {
            GgmlDType::F16
        };
    }
    [dtype, GgmlDType::Q8_0, GgmlDType::F16]
        .into_iter()
        .find(|t| tensor_bytes(*t, shape).is_some())
        .expect("F16 fits any shape")
}

/// The BFL tensors of `checkpoint` and where each one's rows are stored.
fn plan(checkpoint: &Checkpoint, dtype: GgmlDType) -> Result<Vec<Planned>> {
    let files = checkpoint.files();
    let mut names: Vec<&str> = files.names().collect();
    names.sort();
    let mut by_bfl: BTreeMap<String, (Vec<usize>, Vec<Part>)> = BTreeMap::new();
    for stored in names {
        // ComfyUI's scaled-FP8 markers and input scales are not weights; scales are applied.
        if stored.ends_with("scaled_fp8")
            || stored.ends_with(".scale_input")
            || stored.ends_with(".scale_weight")
        {
            continue;
        }
        let shape = files.shape(stored).expect("listed").to_vec();
        let rows = shape.first().copied().unwrap_or(1);
        let pieces = match checkpoint.layout() {
            Layout::Bfl => {
                let name = stored
                    .strip_prefix(checkpoint.bfl_prefix())
                    .unwrap_or(stored);
                vec![BflPiece {
                    name: name.to_string(),
                    rows: 0..rows,
                    stored_rows: 0..rows,
                    total_rows: rows,
                }]
            }
            Layout::Diffusers => {
                bfl_tensor_of(stored, rows, checkpoint.config()).ok_or_else(|| {
                    FluxError::Config {
                        path: files.paths().first().cloned(),
                        message: format!("tensor `{stored}` has no place in a FLUX transformer"),
                    }
                })?
            }
        };
        for piece in pieces {
            let entry = by_bfl.entry(piece.name).or_insert_with(|| {
                let mut full = shape.clone();
                if let Some(first) = full.first_mut() {
                    *first = piece.total_rows;
                }
                (full, Vec::new())
            });
            entry.1.push(Part {
                stored: stored.to_string(),
                stored_rows: piece.stored_rows,
                rows: piece.rows,
            });
        }
    }
    let mut planned = Vec::with_capacity(by_bfl.len());
    for (name, (shape, mut parts)) in by_bfl {
        parts.sort_by_key(|p| p.rows.start);
        let covered: usize = parts.iter().map(|p| p.rows.len()).sum();
        if covered != shape.first().copied().unwrap_or(1) {
            return Err(FluxError::Config {
                path: files.paths().first().cloned(),
                message: format!("the parts of `{name}` do not make its {shape:?}"),
            });
        }
        planned.push(Planned {
            dtype: tensor_type(&name, &shape, dtype),
            name,
            shape,
            parts,
        });
    }
    Ok(planned)
}

fn write_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

/// A change added to a linear layer's weight before it is quantized (a LoRA merged in): the
/// layer's diffusers module path and its `[out, in]` f32 delta, computed when the tensor holding
/// that layer is written.
pub struct WeightDelta<'a> {
    pub module: String,
    pub delta: Box<dyn Fn() -> candle_core::Result<Tensor> + 'a>,
}

/// Writes `checkpoint` to `out` as GGUF (version 3, BFL names, `general.architecture` `flux`),
/// its matrices in `dtype` where their widths allow, each with `deltas` added first.
/// `progress(done, total)` after each tensor.
pub fn write_gguf(
    checkpoint: &Checkpoint,
    dtype: GgmlDType,
    deltas: &[WeightDelta],
    out: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<QuantizeSummary> {
    let planned = plan(checkpoint, dtype)?;
    // The deltas by the BFL tensor that holds their layer.
    let mut by_tensor: BTreeMap<String, Vec<(BflPart, &WeightDelta)>> = BTreeMap::new();
    for delta in deltas {
        let (bfl, part) = bfl_linear(&delta.module, checkpoint.config()).ok_or_else(|| {
            FluxError::Input(format!(
                "`{}` is not a linear layer of this transformer",
                delta.module
            ))
        })?;
        by_tensor
            .entry(format!("{bfl}.weight"))
            .or_default()
            .push((part, delta));
    }
    let io_err = |source| FluxError::Io {
        path: out.to_path_buf(),
        source,
    };
    let folder = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let temp = tempfile::NamedTempFile::new_in(folder).map_err(io_err)?;
    let mut w = BufWriter::new(temp.as_file());
    let metadata: [(&str, u32, Vec<u8>); 4] = [
        ("general.architecture", 8, string_value("flux")),
        (
            "general.quantization_version",
            4,
            2u32.to_le_bytes().to_vec(),
        ),
        (
            "general.file_type",
            4,
            file_type(dtype).to_le_bytes().to_vec(),
        ),
        (
            "general.alignment",
            4,
            (ALIGNMENT as u32).to_le_bytes().to_vec(),
        ),
    ];
    let mut header = Vec::new();
    header.extend(b"GGUF");
    header.extend(3u32.to_le_bytes());
    header.extend((planned.len() as u64).to_le_bytes());
    header.extend((metadata.len() as u64).to_le_bytes());
    for (key, kind, value) in &metadata {
        write_str(&mut header, key).map_err(io_err)?;
        header.extend(kind.to_le_bytes());
        header.extend(value);
    }
    let mut offset = 0usize;
    let mut sizes = Vec::with_capacity(planned.len());
    for t in &planned {
        write_str(&mut header, &t.name).map_err(io_err)?;
        header.extend((t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            header.extend((*d as u64).to_le_bytes());
        }
        header.extend(ggml_id(t.dtype).to_le_bytes());
        header.extend((offset as u64).to_le_bytes());
        let size = tensor_bytes(t.dtype, &t.shape).expect("types are chosen to fit");
        sizes.push(size);
        offset += size.div_ceil(ALIGNMENT) * ALIGNMENT;
    }
    header.resize(header.len().div_ceil(ALIGNMENT) * ALIGNMENT, 0);
    w.write_all(&header).map_err(io_err)?;

    let mut summary = QuantizeSummary {
        tensors: planned.len(),
        bytes: 0,
        types: BTreeMap::new(),
    };
    for (i, (t, size)) in planned.iter().zip(&sizes).enumerate() {
        let mut values = read_bfl(checkpoint, t)?;
        for (part, delta) in by_tensor.get(&t.name).into_iter().flatten() {
            values = add_delta(&values, part, &(delta.delta)()?)?;
        }
        let blocks = quantize_rows(&values, t.dtype, &Device::Cpu)?;
        let data = blocks.data()?;
        debug_assert_eq!(data.len(), *size);
        w.write_all(&data).map_err(io_err)?;
        let padding = size.div_ceil(ALIGNMENT) * ALIGNMENT - size;
        w.write_all(&vec![0u8; padding]).map_err(io_err)?;
        *summary.types.entry(ggml_type_name(t.dtype)).or_default() += 1;
        progress(i + 1, planned.len());
    }
    w.flush().map_err(io_err)?;
    summary.bytes = w.stream_position().map_err(io_err)?;
    drop(w);
    temp.as_file().sync_all().map_err(io_err)?;
    // A temporary file is private (0600); the result is an ordinary file.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(temp.path(), std::fs::Permissions::from_mode(0o644))
            .map_err(io_err)?;
    }
    temp.persist(out).map_err(|e| io_err(e.error))?;
    Ok(summary)
}

/// `values` (a BFL tensor) with `delta` (one diffusers layer's change) added where `part`
/// says that layer sits.
fn add_delta(values: &Tensor, part: &BflPart, delta: &Tensor) -> Result<Tensor> {
    Ok(match part {
        BflPart::Whole => (values + delta)?,
        BflPart::Rows { rows, total_rows } => Tensor::cat(
            &[
                values.narrow(0, 0, rows.start)?,
                (values.narrow(0, rows.start, rows.len())? + delta)?,
                values.narrow(0, rows.end, total_rows - rows.end)?,
            ],
            0,
        )?,
        BflPart::SwappedHalves => {
            let half = delta.dim(0)? / 2;
            let swapped = Tensor::cat(
                &[delta.narrow(0, half, half)?, delta.narrow(0, 0, half)?],
                0,
            )?;
            (values + swapped)?
        }
    })
}

fn string_value(s: &str) -> Vec<u8> {
    let mut v = Vec::new();
    write_str(&mut v, s).expect("writing to a Vec");
    v
}

/// The BFL tensor `t` in f32 on the CPU, assembled from its stored parts (scaled-FP8 scales
/// applied, the final modulation's halves put back in BFL's order).
fn read_bfl(checkpoint: &Checkpoint, t: &Planned) -> Result<Tensor> {
    let mut parts = Vec::with_capacity(t.parts.len());
    for part in &t.parts {
        parts.push(checkpoint.read_stored(
            &part.stored,
            part.stored_rows.clone(),
            DType::F32,
            &Device::Cpu,
        )?);
    }
    let tensor = match parts.len() {
        1 => parts.pop().expect("one"),
        _ => Tensor::cat(&parts, 0)?,
    };
    Ok(tensor.reshape(t.shape.as_slice())?)
}
