//! GGUF headers: the key-value metadata and the tensor directory, parsed from a memory map with
//! every length and count checked against the bytes that are really there (a hostile or truncated
//! file is an error, never a huge allocation). Tensor data is not read here: [`crate::TensorFiles`]
//! serves it, dense or quantized.

use std::collections::BTreeMap;
use std::ops::Range;

use candle_core::quantized::GgmlDType;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's limit on tensor rank.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays are legal; more than a few levels is not a real file.
const MAX_ARRAY_DEPTH: usize = 4;

/// A metadata value. Arrays keep their length only: FLUX and T5 files need none of their items
/// (tokenizer vocabularies are the big ones), so none are held in memory.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    Int(i128),
    Float(f64),
    Bool(bool),
    String(String),
    Array { len: u64 },
}

impl GgufValue {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i128> {
        match self {
            GgufValue::Int(i) => Some(*i),
            _ => None,
        }
    }
}

/// Where one tensor is and what it is.
#[derive(Debug, Clone)]
pub struct GgufTensor {
    pub name: String,
    pub dtype: GgmlDType,
    /// In PyTorch's order (outermost first): GGUF stores ggml's innermost-first order.
    pub shape: Vec<usize>,
    /// Byte range of the data within the file.
    pub bytes: Range<usize>,
}

#[derive(Debug)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensor>,
}

/// What was wrong with the file, at which byte.
#[derive(Debug)]
pub struct GgufError(pub String);

type Parse<T> = std::result::Result<T, GgufError>;

struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &str) -> Parse<&'a [u8]> {
        let remaining = (self.data.len() - self.pos) as u64;
        if n > remaining {
            return Err(GgufError(format!(
                "{what} at byte {} needs {n} bytes, {remaining} are left (truncated download?)",
                self.pos
            )));
        }
        let slice = &self.data[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(slice)
    }

    fn u32(&mut self, what: &str) -> Parse<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }

    fn u64(&mut self, what: &str) -> Parse<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }

    fn string(&mut self, what: &str) -> Parse<String> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| GgufError(format!("{what} at byte {} is not UTF-8", self.pos)))
    }

    /// A count of items each at least `min_item` bytes long: bounded by what is left.
    fn count(&mut self, min_item: u64, what: &str) -> Parse<u64> {
        let n = self.u64(what)?;
        let remaining = (self.data.len() - self.pos) as u64;
        if n.saturating_mul(min_item) > remaining {
            return Err(GgufError(format!(
                "{what} says {n} items, more than the {remaining} bytes left can hold"
            )));
        }
        Ok(n)
    }

    fn value(&mut self, kind: u32, depth: usize, key: &str) -> Parse<GgufValue> {
        let scalar = |bytes: &[u8]| {
            let mut b = [0u8; 8];
            b[..bytes.len()].copy_from_slice(bytes);
            u64::from_le_bytes(b)
        };
        Ok(match kind {
            0 => GgufValue::Int(self.take(1, key)?[0] as i128),
            1 => GgufValue::Int(self.take(1, key)?[0] as i8 as i128),
            2 => GgufValue::Int(scalar(self.take(2, key)?) as u16 as i128),
            3 => GgufValue::Int(scalar(self.take(2, key)?) as u16 as i16 as i128),
            4 => GgufValue::Int(self.u32(key)? as i128),
            5 => GgufValue::Int(self.u32(key)? as i32 as i128),
            6 => GgufValue::Float(f32::from_bits(self.u32(key)?) as f64),
            7 => match self.take(1, key)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                other => return Err(GgufError(format!("`{key}`: {other} is not a boolean"))),
            },
            8 => GgufValue::String(self.string(key)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError(format!("`{key}`: arrays nested too deep")));
                }
                let item = self.u32(key)?;
                let min_item = match item {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    // Strings and arrays carry an 8-byte length.
                    8..=12 => 8,
                    other => {
                        return Err(GgufError(format!(
                            "`{key}`: unknown array item type {other}"
                        )))
                    }
                };
                let len = self.count(min_item, key)?;
                for _ in 0..len {
                    self.value(item, depth + 1, key)?;
                }
                GgufValue::Array { len }
            }
            10 => GgufValue::Int(self.u64(key)? as i128),
            11 => GgufValue::Int(self.u64(key)? as i64 as i128),
            12 => GgufValue::Float(f64::from_bits(self.u64(key)?)),
            other => return Err(GgufError(format!("`{key}`: unknown value type {other}"))),
        })
    }
}

/// ggml's type ids (ggml.h) of the types candle can hold: one table for reading and writing.
const GGML_IDS: [(u32, GgmlDType); 15] = [
    (0, GgmlDType::F32),
    (1, GgmlDType::F16),
    (2, GgmlDType::Q4_0),
    (3, GgmlDType::Q4_1),
    (6, GgmlDType::Q5_0),
    (7, GgmlDType::Q5_1),
    (8, GgmlDType::Q8_0),
    (9, GgmlDType::Q8_1),
    (10, GgmlDType::Q2K),
    (11, GgmlDType::Q3K),
    (12, GgmlDType::Q4K),
    (13, GgmlDType::Q5K),
    (14, GgmlDType::Q6K),
    (15, GgmlDType::Q8K),
    (30, GgmlDType::BF16),
];

/// The type of ggml id `id`, if candle can hold it.
pub fn ggml_dtype(id: u32) -> Option<GgmlDType> {
    GGML_IDS.iter().find(|(i, _)| *i == id).map(|(_, t)| *t)
}

/// The ggml id of `dtype`.
pub fn ggml_id(dtype: GgmlDType) -> u32 {
    GGML_IDS
        .iter()
        .find(|(_, t)| *t == dtype)
        .map(|(i, _)| *i)
        .expect("every candle type has a ggml id")
}

/// The name ggml and the community's file names use (`Q4_K`, `Q8_0`, `BF16`).
pub fn ggml_type_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// Names of ggml types candle cannot hold, for the error message.
fn unknown_type_name(id: u32) -> String {
    let known = [
        (4, "Q4_2 (removed from ggml)"),
        (5, "Q4_3 (removed from ggml)"),
        (16, "IQ2_XXS"),
        (17, "IQ2_XS"),
        (18, "IQ3_XXS"),
        (19, "IQ1_S"),
        (20, "IQ4_NL"),
        (21, "IQ3_S"),
        (22, "IQ2_S"),
        (23, "IQ4_XS"),
        (29, "IQ1_M"),
        (34, "TQ1_0"),
        (35, "TQ2_0"),
        (39, "MXFP4"),
    ];
    match known.iter().find(|(k, _)| *k == id) {
        Some((_, name)) => format!("{name} (type {id})"),
        None => format!("unknown type {id}"),
    }
}

/// Bytes a tensor of `shape` (PyTorch order) takes in `dtype`; the innermost dimension must be
/// whole blocks.
pub fn tensor_bytes(dtype: GgmlDType, shape: &[usize]) -> Option<usize> {
    let inner = *shape.last().unwrap_or(&1);
    if inner % dtype.block_size() != 0 {
        return None;
    }
    let elements = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))?;
    (elements / dtype.block_size()).checked_mul(dtype.type_size())
}

/// Parses the header of a GGUF file held in `data`.
/// Byte offsets, within each block, of a type's f16 scales (`d`, and `dmin` or `m` where the
/// type has one), as ggml's `block_*` structs lay them out; `None` for types without blocks.
fn f16_scale_offsets(dtype: GgmlDType) -> Option<&'static [usize]> {
    Some(match dtype {
        GgmlDType::Q4_0 | GgmlDType::Q5_0 | GgmlDType::Q8_0 => &[0],
        GgmlDType::Q4_1 | GgmlDType::Q5_1 | GgmlDType::Q4K | GgmlDType::Q5K => &[0, 2],
        GgmlDType::Q2K => &[80, 82],
        GgmlDType::Q3K => &[108],
        GgmlDType::Q6K => &[208],
        _ => return None,
    })
}

/// Whether every block's scales in `bytes` (blocks of `dtype`) are finite. The quants are
/// small integers and the sub-block scales 6-bit ones, so a block dequantizes to finite values
/// exactly when these are: checked without dequantizing. `None` for a type this cannot read
/// (check its dequantized values instead).
pub fn block_scales_finite(dtype: GgmlDType, bytes: &[u8]) -> Option<bool> {
    let offsets = f16_scale_offsets(dtype)?;
    let block = dtype.type_size();
    // An f16 is infinite or NaN when its exponent bits are all set.
    let finite = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]) & 0x7c00 != 0x7c00;
    Some((0..bytes.len() / block).all(|b| offsets.iter().all(|&o| finite(b * block + o))))
}

pub fn parse(data: &[u8]) -> Parse<GgufHeader> {
    let mut c = Cursor { data, pos: 0 };
    if c.take(4, "the magic number")? != MAGIC {
        return Err(GgufError("not a GGUF file (no `GGUF` magic number)".into()));
    }
    let version = c.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(GgufError(format!(
            "GGUF version {version} is not supported (versions 2 and 3 are)"
        )));
    }
    // Each tensor entry is at least 8 (name) + 4 + 4 + 8 bytes; each key-value at least 8 + 4 + 1.
    let n_tensors = c.count(24, "the tensor count")?;
    let n_kv = c.count(13, "the metadata count")?;
    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = c.string("a metadata key")?;
        let kind = c.u32(&key)?;
        let value = c.value(kind, 0, &key)?;
        metadata.insert(key, value);
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(GgufValue::Int(a)) if *a > 0 && *a <= 1 << 16 && (*a as u64).is_power_of_two() => {
            *a as u64
        }
        Some(other) => {
            return Err(GgufError(format!(
                "`general.alignment` is {other:?}, not a power of two"
            )))
        }
    };
    let mut infos = Vec::with_capacity(n_tensors as usize);
    for _ in 0..n_tensors {
        let name = c.string("a tensor name")?;
        let n_dims = c.u32(&name)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(GgufError(format!(
                "tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMS} are possible)"
            )));
        }
        let mut shape = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = c.u64(&name)?;
            shape.push(usize::try_from(d).map_err(|_| {
                GgufError(format!("tensor `{name}` has the impossible dimension {d}"))
            })?);
        }
        shape.reverse();
        let type_id = c.u32(&name)?;
        let dtype = ggml_dtype(type_id).ok_or_else(|| {
            GgufError(format!(
                "tensor `{name}` is stored as {}, which icedit cannot read (it reads F32, F16, \
                 BF16, Q8_0, Q6_K, Q5_K, Q5_0, Q5_1, Q4_K, Q4_0, Q4_1, Q3_K, Q2_K)",
                unknown_type_name(type_id)
            ))
        })?;
        let offset = c.u64(&name)?;
        if offset % alignment != 0 {
            return Err(GgufError(format!(
                "tensor `{name}` starts at offset {offset}, not a multiple of the file's \
                 alignment {alignment}"
            )));
        }
        infos.push((name, dtype, shape, offset));
    }
    let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
    let mut tensors = Vec::with_capacity(infos.len());
    let mut seen = std::collections::HashSet::new();
    for (name, dtype, shape, offset) in infos {
        if !seen.insert(name.clone()) {
            return Err(GgufError(format!("tensor `{name}` appears twice")));
        }
        let len = tensor_bytes(dtype, &shape).ok_or_else(|| {
            GgufError(format!(
                "tensor `{name}` of shape {shape:?} cannot be stored as {} (its last dimension \
                 must be a multiple of {})",
                ggml_type_name(dtype),
                dtype.block_size()
            ))
        })?;
        let start = data_start.checked_add(offset);
        let end = start.and_then(|s| s.checked_add(len as u64));
        match (start, end) {
            (Some(start), Some(end)) if end <= data.len() as u64 => tensors.push(GgufTensor {
                name,
                dtype,
                shape,
                bytes: start as usize..end as usize,
            }),
            _ => {
                return Err(GgufError(format!(
                    "tensor `{name}` runs past the end of the file (truncated download?)"
                )))
            }
        }
    }
    Ok(GgufHeader {
        version,
        metadata,
        tensors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    /// A GGUF file with one 2x32 Q8_0 tensor and one string key.
    fn tiny_file() -> Vec<u8> {
        let mut f = b"GGUF".to_vec();
        f.extend(3u32.to_le_bytes());
        f.extend(1u64.to_le_bytes());
        f.extend(1u64.to_le_bytes());
        string(&mut f, "general.architecture");
        f.extend(8u32.to_le_bytes());
        string(&mut f, "flux");
        string(&mut f, "w");
        f.extend(2u32.to_le_bytes());
        f.extend(32u64.to_le_bytes());
        f.extend(2u64.to_le_bytes());
        f.extend(8u32.to_le_bytes());
        f.extend(0u64.to_le_bytes());
        while f.len() % 32 != 0 {
            f.push(0);
        }
        f.extend(vec![0u8; 2 * 34]);
        f
    }

    #[test]
    fn reads_the_directory_in_pytorch_order() {
        let file = tiny_file();
        let header = parse(&file).unwrap();
        assert_eq!(
            header.metadata["general.architecture"].as_str(),
            Some("flux")
        );
        let t = &header.tensors[0];
        assert_eq!(
            (t.name.as_str(), t.dtype, t.shape.as_slice()),
            ("w", GgmlDType::Q8_0, &[2usize, 32][..])
        );
        assert_eq!(t.bytes.len(), 68);
        assert_eq!(t.bytes.end, file.len());
    }

    #[test]
    fn every_truncation_is_an_error() {
        let file = tiny_file();
        for len in 0..file.len() {
            assert!(parse(&file[..len]).is_err(), "accepted {len} bytes");
        }
    }

    #[test]
    fn huge_counts_are_refused_before_allocating() {
        let mut file = tiny_file();
        file[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = parse(&file).unwrap_err().0;
        assert!(err.contains("tensor count"), "{err}");
        let mut file = tiny_file();
        // The key's length.
        file[24..32].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        assert!(parse(&file).unwrap_err().0.contains("bytes"));
    }

    #[test]
    fn scale_check_agrees_with_dequantizing() {
        use candle_core::quantized::QTensor;
        use candle_core::Device;
        let values = icedit_test_support::randn(0f32, 1.0, (4, 512));
        for dtype in [
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
        ] {
            let q = QTensor::quantize(&values, dtype).unwrap();
            let mut bytes = q.data().unwrap().into_owned();
            assert_eq!(block_scales_finite(dtype, &bytes), Some(true), "{dtype:?}");
            // Each scale field, set to NaN in the third block, is caught, and dequantizing
            // agrees that the block is spoilt.
            for &offset in f16_scale_offsets(dtype).unwrap() {
                let mut spoilt = bytes.clone();
                let at = 2 * dtype.type_size() + offset;
                spoilt[at..at + 2].copy_from_slice(&half::f16::NAN.to_bits().to_le_bytes());
                assert_eq!(
                    block_scales_finite(dtype, &spoilt),
                    Some(false),
                    "{dtype:?}"
                );
                let storage =
                    candle_core::quantized::QStorage::from_data(spoilt.into(), &Device::Cpu, dtype)
                        .unwrap();
                let deq = QTensor::new(storage, (4, 512))
                    .unwrap()
                    .dequantize(&Device::Cpu)
                    .unwrap();
                assert!(
                    !crate::finite::all_finite(&deq).unwrap(),
                    "{dtype:?} at {offset}"
                );
            }
            bytes.truncate(0);
        }
    }

    #[test]
    fn unknown_types_are_named() {
        let mut file = tiny_file();
        // The type follows the two dimensions (32, 2).
        let dims = file
            .windows(8)
            .position(|w| w == 32u64.to_le_bytes())
            .unwrap();
        let type_pos = dims + 16;
        file[type_pos..type_pos + 4].copy_from_slice(&23u32.to_le_bytes());
        let err = parse(&file).unwrap_err().0;
        assert!(err.contains("IQ4_XS"), "{err}");
    }
}
