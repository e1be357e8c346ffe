//! Shared by the `fuzz_parsers` tests of several crates (each includes it with `#[path]`):
//! proptest settings, a per-case bound on time and on the largest single allocation, and
//! structure-aware mutators for JSON and for raw bytes, with a safetensors file builder.
//!
//! The case counts are small so that `cargo test --workspace` stays fast; set
//! `ICEDIT_FUZZ_SCALE=20` (a multiplier) for a longer run. The cases come from a fixed seed, so a
//! run of the test suite is the same run everywhere; `PROPTEST_RNG_SEED=N` explores others (and
//! replays one). Failures are not persisted: proptest prints the minimal failing input instead.

#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use serde_json::{json, Map, Value};

// ---------------------------------------------------------------------------------------------
// Bounds

/// Counts the largest single allocation each thread asks for, so that a parser that allocates
/// what a header claims (rather than what the file holds) is caught even when the allocation
/// happens to succeed.
pub struct TrackingAlloc;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|m| {
        if size > m.get() {
            m.set(size)
        }
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged.
unsafe impl GlobalAlloc for TrackingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: TrackingAlloc = TrackingAlloc;

/// One case may take this long (a hang shows up as a failure rather than a stuck CI job;
/// generous, since CI machines are slow and debug-assertion builds slower).
pub const MAX_CASE_TIME: Duration = Duration::from_secs(20);

/// Runs one case: `f` must return within [`MAX_CASE_TIME`] and allocate no single block larger
/// than `max_alloc` bytes on this thread.
pub fn bounded<T>(what: &str, max_alloc: usize, f: impl FnOnce() -> T) -> T {
    LARGEST.with(|m| m.set(0));
    let start = Instant::now();
    let out = f();
    let elapsed = start.elapsed();
    let largest = LARGEST.with(|m| m.get());
    assert!(
        elapsed <= MAX_CASE_TIME,
        "{what}: took {elapsed:?} (more than {MAX_CASE_TIME:?})"
    );
    assert!(
        largest <= max_alloc,
        "{what}: allocated {largest} bytes at once (more than {max_alloc})"
    );
    out
}

/// The seed of the cases unless `PROPTEST_RNG_SEED` names another.
const FUZZ_SEED: u64 = 0x1ced_f022;

/// Proptest settings: `cases` (scaled by `ICEDIT_FUZZ_SCALE`) from [`FUZZ_SEED`] (or
/// `PROPTEST_RNG_SEED`), nothing written to disk, bounded shrinking.
pub fn config(cases: u32) -> Config {
    let defaults = Config::default();
    let rng_seed = match defaults.rng_seed {
        // Not set in the environment.
        RngSeed::Random => RngSeed::Fixed(FUZZ_SEED),
        chosen => chosen,
    };
    let scale = std::env::var("ICEDIT_FUZZ_SCALE")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(1.0);
    Config {
        cases: ((cases as f64 * scale).ceil() as u32).max(1),
        failure_persistence: None,
        max_shrink_iters: 1024,
        max_shrink_time: 60_000,
        rng_seed,
        ..defaults
    }
}

// ---------------------------------------------------------------------------------------------
// JSON mutations

/// A string value that is written into the JSON text verbatim (not as a string), for literals
/// `serde_json::Value` cannot hold: `1e400`, `NaN`, integers past u64, deep nesting.
const RAW: &str = "\u{0}RAW:";
/// An object key written without this prefix, so that it duplicates an existing key.
const DUP: &str = "\u{0}DUP:";

/// Raw JSON literals no `Value` can carry.
fn raw_literals() -> Vec<String> {
    let mut raw: Vec<String> = [
        "1e400",
        "-1e400",
        "NaN",
        "Infinity",
        "-Infinity",
        "18446744073709551616",
        "-18446744073709551616",
        "-9223372036854775809",
        "340282366920938463463374607431768211456",
        "0x10",
        "01",
        "1_000",
        "+1",
        ".5",
        "1.",
        "-",
        "tru",
        "nul",
        "[",
        "{",
        "]",
        "}",
        "",
        "\u{feff}1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    raw.push(format!("{}1{}", "[".repeat(100), "]".repeat(100)));
    raw.push(format!("{}1{}", "[".repeat(5000), "]".repeat(5000)));
    raw.push(format!("{}{}", "{\"a\":".repeat(3000), "}".repeat(3000)));
    raw.push(format!("{}1", "[".repeat(3000)));
    raw
}

/// Numbers at and around the edges of every integer type, and odd floats.
pub fn odd_number() -> impl Strategy<Value = Value> {
    let edges: Vec<Value> = vec![
        json!(0),
        json!(1),
        json!(-1),
        json!(2),
        json!(3),
        json!(4),
        json!(7),
        json!(16),
        json!(32),
        json!(64),
        json!(128),
        json!(255),
        json!(256),
        json!(4096),
        json!(65535),
        json!(65536),
        json!(1u64 << 31),
        json!(u32::MAX),
        json!(1u64 << 32),
        json!((1u64 << 53) + 1),
        json!(i64::MAX),
        json!(i64::MIN),
        json!(u64::MAX),
        json!(u64::MAX - 7),
        json!(usize::MAX / 2 + 1),
        json!(0.0),
        json!(-0.0),
        json!(0.5),
        json!(1.5),
        json!(-2.5),
        json!(3.0),
        json!(1e-310),
        json!(1e308),
        json!(-1e308),
        json!(f64::MAX),
        json!(f64::MIN_POSITIVE),
    ];
    // Sizes that overflow whatever adds or multiplies them, drawn often.
    let huge: Vec<Value> = vec![
        json!(u64::MAX),
        json!(u64::MAX - 7),
        json!(1u64 << 63),
        json!(i64::MAX),
        json!(1u64 << 32),
        json!(u32::MAX),
    ];
    prop_oneof![
        4 => proptest::sample::select(edges),
        2 => proptest::sample::select(huge),
        1 => any::<i64>().prop_map(|v| json!(v)),
        1 => any::<u64>().prop_map(|v| json!(v)),
        1 => any::<f64>().prop_filter("finite", |v| v.is_finite()).prop_map(|v| json!(v)),
    ]
}

/// Strings a config or header might hold, right or wrong.
pub fn odd_string() -> impl Strategy<Value = String> {
    let words: Vec<String> = [
        "",
        " ",
        "F32",
        "F16",
        "BF16",
        "F64",
        "I64",
        "I32",
        "I16",
        "I8",
        "U8",
        "U16",
        "U32",
        "U64",
        "BOOL",
        "F8_E4M3",
        "F8_E5M2",
        "F8_E8M0",
        "F4",
        "F6_E2M3",
        "C64",
        "f32",
        "XX",
        "silu",
        "gelu",
        "gelu_new",
        "quick_gelu",
        "relu",
        "gated-gelu",
        "gated-silu",
        "gated-",
        "exponential",
        "linear",
        "AutoencoderKL",
        "FluxTransformer2DModel",
        "DownEncoderBlock2D",
        "UpDecoderBlock2D",
        "NaN",
        "inf",
        "-1",
        "1e400",
        "lora",
        "moe-lora",
        "\u{0}",
        "é",
        "\u{10ffff}",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    prop_oneof![
        3 => proptest::sample::select(words),
        1 => ".{0,12}",
        1 => Just("x".repeat(100_000)),
    ]
}

/// Any odd JSON value, including raw literals (see [`RAW`]).
pub fn odd_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::Bool),
        4 => odd_number(),
        2 => odd_string().prop_map(Value::String),
        2 => proptest::sample::select(raw_literals()).prop_map(|r| Value::String(format!("{RAW}{r}"))),
    ];
    prop_oneof![
        6 => leaf.clone(),
        2 => proptest::collection::vec(leaf.clone(), 0..5).prop_map(Value::Array),
        1 => proptest::collection::btree_map("[a-z_]{1,8}", leaf, 0..3)
            .prop_map(|m| Value::Object(m.into_iter().collect())),
    ]
}

/// One structural edit of a JSON document; the `usize` picks the node (modulo their count, in
/// depth-first order, the root first).
#[derive(Debug, Clone)]
pub enum JsonEdit {
    Replace(usize, Value),
    Remove(usize),
    /// In an object: a new key (or a duplicate of one of its keys); in an array: a new item.
    Insert(usize, String, Value),
    Duplicate(usize),
    /// Replaces a number (of the numbers only, modulo their count).
    Number(usize, Value),
}

pub fn json_edit() -> impl Strategy<Value = JsonEdit> {
    let at = any::<usize>();
    prop_oneof![
        5 => (at, odd_value()).prop_map(|(i, v)| JsonEdit::Replace(i, v)),
        2 => at.prop_map(JsonEdit::Remove),
        2 => (at, "[a-z_]{1,10}", odd_value()).prop_map(|(i, k, v)| JsonEdit::Insert(i, k, v)),
        1 => at.prop_map(JsonEdit::Duplicate),
        3 => (at, prop_oneof![4 => odd_number(), 1 => odd_value()]).prop_map(|(i, v)| JsonEdit::Number(i, v)),
    ]
}

pub fn json_edits(max: usize) -> impl Strategy<Value = Vec<JsonEdit>> {
    proptest::collection::vec(json_edit(), 0..=max)
}

/// Often nothing, else one to `max` of `edit`: so that combining several kinds of mutation
/// still leaves many inputs valid enough to reach the deeper code.
pub fn sometimes<T: std::fmt::Debug + Clone>(
    edit: impl Strategy<Value = T> + 'static,
    max: usize,
) -> impl Strategy<Value = Vec<T>> {
    prop_oneof![
        2 => Just(Vec::new()),
        1 => proptest::collection::vec(edit, 1..=max.max(1)),
    ]
}

#[derive(Debug, Clone)]
enum Seg {
    Key(String),
    Index(usize),
}

fn node_paths(value: &Value, prefix: &mut Vec<Seg>, out: &mut Vec<Vec<Seg>>) {
    out.push(prefix.clone());
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                prefix.push(Seg::Key(k.clone()));
                node_paths(v, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                prefix.push(Seg::Index(i));
                node_paths(v, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

fn node_mut<'a>(value: &'a mut Value, path: &[Seg]) -> &'a mut Value {
    path.iter().fold(value, |v, seg| match (seg, v) {
        (Seg::Key(k), Value::Object(m)) => m.get_mut(k).expect("path from node_paths"),
        (Seg::Index(i), Value::Array(a)) => &mut a[*i],
        _ => unreachable!("path from node_paths"),
    })
}

/// Applies `edits` to `value` in order.
pub fn apply_json_edits(value: &mut Value, edits: &[JsonEdit]) {
    for edit in edits {
        let mut paths = Vec::new();
        node_paths(value, &mut Vec::new(), &mut paths);
        let pick = |i: &usize| paths[i % paths.len()].clone();
        match edit {
            JsonEdit::Replace(i, v) => *node_mut(value, &pick(i)) = v.clone(),
            JsonEdit::Remove(i) => {
                let path = pick(i);
                if let Some((last, parent)) = path.split_last() {
                    match (last, node_mut(value, parent)) {
                        (Seg::Key(k), Value::Object(m)) => {
                            m.remove(k);
                        }
                        (Seg::Index(i), Value::Array(a)) => {
                            a.remove(*i);
                        }
                        _ => unreachable!(),
                    }
                }
            }
            JsonEdit::Insert(i, key, v) => match node_mut(value, &pick(i)) {
                Value::Object(m) => {
                    m.insert(key.clone(), v.clone());
                }
                Value::Array(a) => a.push(v.clone()),
                other => *other = v.clone(),
            },
            JsonEdit::Number(i, v) => {
                let numbers: Vec<&Vec<Seg>> = paths
                    .iter()
                    .filter(|p| node_mut(&mut value.clone(), p).is_number())
                    .collect();
                if !numbers.is_empty() {
                    let path = numbers[i % numbers.len()].clone();
                    *node_mut(value, &path) = v.clone();
                }
            }
            JsonEdit::Duplicate(i) => {
                if let Value::Object(m) = node_mut(value, &pick(i)) {
                    if let Some((k, v)) = m.iter().next().map(|(k, v)| (k.clone(), v.clone())) {
                        m.insert(format!("{DUP}{k}"), v);
                    }
                }
            }
        }
    }
}

/// The JSON text of `value`, with [`RAW`] strings written verbatim and [`DUP`] keys turned into
/// duplicates.
pub fn json_text(value: &Value) -> String {
    let mut text = serde_json::to_string_pretty(value).expect("serializable");
    let dup = "\"\\u0000DUP:";
    text = text.replace(dup, "\"");
    let raw = "\"\\u0000RAW:";
    while let Some(start) = text.find(raw) {
        let body = start + raw.len();
        let end = body + text[body..].find('"').expect("closing quote");
        let literal = text[body..end].to_string();
        text.replace_range(start..=end, &literal);
    }
    text
}

// ---------------------------------------------------------------------------------------------
// Byte mutations

#[derive(Debug, Clone)]
pub enum ByteEdit {
    Set(usize, u8),
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Truncate(usize),
}

pub fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    let at = any::<usize>();
    prop_oneof![
        3 => (at, any::<u8>()).prop_map(|(i, b)| ByteEdit::Set(i, b)),
        3 => (at, 0u8..8).prop_map(|(i, bit)| ByteEdit::Flip(i, 1 << bit)),
        1 => (at, proptest::collection::vec(any::<u8>(), 1..16)).prop_map(|(i, b)| ByteEdit::Insert(i, b)),
        1 => (at, 1usize..16).prop_map(|(i, n)| ByteEdit::Delete(i, n)),
        1 => at.prop_map(ByteEdit::Truncate),
    ]
}

pub fn byte_edits(max: usize) -> impl Strategy<Value = Vec<ByteEdit>> {
    proptest::collection::vec(byte_edit(), 0..=max)
}

/// Applies `edits`; positions are taken modulo the length, but within the first `focus` bytes
/// (where the headers are) when `focus` is smaller.
pub fn apply_byte_edits(bytes: &mut Vec<u8>, edits: &[ByteEdit], focus: usize) {
    for edit in edits {
        let span = bytes.len().min(focus.max(1));
        let pos = |i: &usize| if span == 0 { 0 } else { i % span };
        match edit {
            ByteEdit::Set(i, b) if !bytes.is_empty() => {
                let p = pos(i);
                bytes[p] = *b
            }
            ByteEdit::Flip(i, m) if !bytes.is_empty() => {
                let p = pos(i);
                bytes[p] ^= m
            }
            ByteEdit::Insert(i, b) => {
                let p = pos(i).min(bytes.len());
                bytes.splice(p..p, b.iter().copied());
            }
            ByteEdit::Delete(i, n) if !bytes.is_empty() => {
                let p = pos(i);
                let end = (p + n).min(bytes.len());
                bytes.drain(p..end);
            }
            ByteEdit::Truncate(i) => {
                let keep = i % (bytes.len() + 1);
                bytes.truncate(keep)
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Safetensors files

/// Size in bytes of one element of a safetensors dtype (0 for sub-byte types).
pub fn dtype_bytes(dtype: &str) -> usize {
    match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "U8" | "I8" | "BOOL" | "F8_E4M3" | "F8_E5M2" | "F8_E8M0" => 1,
        _ => 0,
    }
}

/// One tensor of a generated file, with its raw little-endian data.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl TensorSpec {
    /// A float tensor holding `values` (finite), stored as `dtype` (F32, F64 or BF16, by
    /// truncation, so that the stored values are exactly known).
    pub fn floats(name: &str, dtype: &str, shape: Vec<usize>, values: &[f32]) -> Self {
        let data = match dtype {
            "F32" => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            "F64" => values
                .iter()
                .flat_map(|v| (*v as f64).to_le_bytes())
                .collect(),
            "BF16" => values
                .iter()
                .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
                .collect(),
            other => panic!("floats: {other}"),
        };
        Self {
            name: name.to_string(),
            dtype: dtype.to_string(),
            shape,
            data,
        }
    }

    /// The values as stored, in f32 (for F32, F64 and BF16 tensors).
    pub fn stored_values(&self) -> Vec<f32> {
        match self.dtype.as_str() {
            "F32" => self
                .data
                .chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            "F64" => self
                .data
                .chunks(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            "BF16" => self
                .data
                .chunks(2)
                .map(|c| f32::from_bits((u16::from_le_bytes(c.try_into().unwrap()) as u32) << 16))
                .collect(),
            other => panic!("stored_values: {other}"),
        }
    }
}

/// The JSON header of `tensors` (offsets in the given order) and `metadata`.
pub fn safetensors_header(
    tensors: &[TensorSpec],
    metadata: Option<&BTreeMap<String, String>>,
) -> Value {
    let mut header = Map::new();
    if let Some(meta) = metadata {
        header.insert("__metadata__".into(), json!(meta));
    }
    let mut offset = 0;
    for t in tensors {
        let end = offset + t.data.len();
        header.insert(
            t.name.clone(),
            json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    Value::Object(header)
}

/// How the 8-byte header length of a generated file is written.
#[derive(Debug, Clone)]
pub enum LengthPrefix {
    Right,
    /// The right length plus this (wrapping).
    Off(i64),
    Exactly(u64),
}

pub fn length_prefix() -> impl Strategy<Value = LengthPrefix> {
    prop_oneof![
        6 => Just(LengthPrefix::Right),
        2 => (-16i64..16).prop_map(LengthPrefix::Off),
        1 => proptest::sample::select(vec![
            0u64, 1, 2, 7, 8, u32::MAX as u64, 100_000_000, 1 << 40, i64::MAX as u64, u64::MAX - 8, u64::MAX,
        ])
        .prop_map(LengthPrefix::Exactly),
        1 => any::<u64>().prop_map(LengthPrefix::Exactly),
    ]
}

/// A safetensors file: the header length, the header text, then `data`.
pub fn safetensors_bytes(header: &[u8], prefix: &LengthPrefix, data: &[u8]) -> Vec<u8> {
    let len = match prefix {
        LengthPrefix::Right => header.len() as u64,
        LengthPrefix::Off(d) => (header.len() as u64).wrapping_add(*d as u64),
        LengthPrefix::Exactly(n) => *n,
    };
    let mut out = len.to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(data);
    out
}

/// A valid safetensors file of `tensors` (offsets in the order given).
pub fn valid_safetensors(
    tensors: &[TensorSpec],
    metadata: Option<&BTreeMap<String, String>>,
) -> Vec<u8> {
    let header = json_text(&safetensors_header(tensors, metadata));
    let data: Vec<u8> = tensors
        .iter()
        .flat_map(|t| t.data.iter().copied())
        .collect();
    safetensors_bytes(header.as_bytes(), &LengthPrefix::Right, &data)
}

/// Shapes meant to break the arithmetic of whoever reads them: empty, zero-sized, products
/// that overflow, dimensions past u32 and u64-sized.
pub fn odd_shape() -> impl Strategy<Value = Value> {
    let m = u64::MAX;
    let edges: Vec<Value> = vec![
        json!([]),
        json!([0]),
        json!([1]),
        json!([0, 0]),
        json!([1, 1, 1, 1]),
        json!([m]),
        json!([m, m]),
        json!([m, 2]),
        json!([2, m / 2 + 1]),
        json!([1u64 << 32, 1u64 << 32]),
        json!([1u64 << 62, 4]),
        json!([(1u64 << 61) + 1, 8]),
        json!([-1]),
        json!([1.5]),
        json!(["1"]),
        json!([null]),
        json!(7),
        json!("[1]"),
        json!({"0": 1}),
        json!(vec![1; 64]),
    ];
    prop_oneof![
        4 => proptest::sample::select(edges),
        2 => proptest::collection::vec(0u64..6, 0..5).prop_map(|s| json!(s)),
        1 => proptest::collection::vec(any::<u64>(), 0..4).prop_map(|s| json!(s)),
    ]
}

/// Whether candle's contiguous strides for `shape` overflow (the product of a suffix of the
/// shape past usize), which a zero-element tensor can have while safetensors accepts it.
pub fn strides_overflow(shape: &[usize]) -> bool {
    shape
        .iter()
        .rev()
        .try_fold(1usize, |prod, d| prod.checked_mul(*d))
        .is_none()
}

/// The number of elements of `shape` (0 when a dimension is 0, whatever the others).
pub fn elements(shape: &[usize]) -> usize {
    if shape.contains(&0) {
        0
    } else {
        shape.iter().product()
    }
}

/// Shapes of zero elements with huge other dimensions (safetensors accepts them: no data).
pub fn empty_huge_shape() -> impl Strategy<Value = Vec<usize>> {
    let big = proptest::sample::select(vec![
        1usize << 31,
        1 << 32,
        1 << 33,
        usize::MAX / 2 + 1,
        usize::MAX,
    ]);
    (proptest::collection::vec(big, 1..4), any::<usize>()).prop_map(|(mut dims, at)| {
        let at = at % (dims.len() + 1);
        dims.insert(at, 0);
        dims
    })
}

/// Data offsets that overlap, run backwards or past the end, are negative or not pairs.
pub fn odd_offsets() -> impl Strategy<Value = Value> {
    let m = u64::MAX;
    let edges: Vec<Value> = vec![
        json!([0, 0]),
        json!([0, m]),
        json!([m, m]),
        json!([m, 0]),
        json!([4, 0]),
        json!([-4, 0]),
        json!([0, -4]),
        json!([0]),
        json!([0, 4, 8]),
        json!([]),
        json!([0.0, 4.0]),
        json!(["0", "4"]),
        json!(null),
        json!([1u64 << 63, (1u64 << 63) + 4]),
    ];
    prop_oneof![
        3 => proptest::sample::select(edges),
        2 => (0u64..4096, 0u64..4096).prop_map(|(a, b)| json!([a, b])),
        1 => (any::<u64>(), any::<u64>()).prop_map(|(a, b)| json!([a, b])),
    ]
}

/// An edit aimed at one tensor entry's field (the generic [`JsonEdit`]s hit them rarely).
#[derive(Debug, Clone)]
pub enum EntryEdit {
    Dtype(usize, Value),
    Shape(usize, Value),
    Offsets(usize, Value),
    Metadata(Value),
}

pub fn entry_edit() -> impl Strategy<Value = EntryEdit> {
    let at = any::<usize>();
    prop_oneof![
        2 => (at, prop_oneof![
            3 => odd_string().prop_map(Value::String),
            1 => odd_value(),
        ]).prop_map(|(i, v)| EntryEdit::Dtype(i, v)),
        3 => (at, odd_shape()).prop_map(|(i, v)| EntryEdit::Shape(i, v)),
        3 => (at, odd_offsets()).prop_map(|(i, v)| EntryEdit::Offsets(i, v)),
        1 => prop_oneof![
            odd_value(),
            proptest::collection::btree_map(".{0,8}", odd_value(), 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ].prop_map(EntryEdit::Metadata),
    ]
}

pub fn apply_entry_edits(header: &mut Value, edits: &[EntryEdit]) {
    let Value::Object(map) = header else { return };
    let names: Vec<String> = map
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect();
    for edit in edits {
        let (i, field, v) = match edit {
            EntryEdit::Metadata(v) => {
                map.insert("__metadata__".into(), v.clone());
                continue;
            }
            EntryEdit::Dtype(i, v) => (i, "dtype", v),
            EntryEdit::Shape(i, v) => (i, "shape", v),
            EntryEdit::Offsets(i, v) => (i, "data_offsets", v),
        };
        if names.is_empty() {
            continue;
        }
        if let Some(Value::Object(entry)) = map.get_mut(&names[i % names.len()]) {
            entry.insert(field.into(), v.clone());
        }
    }
}
