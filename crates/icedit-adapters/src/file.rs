//! Reading an adapter file: its tensors grouped by the module they adapt, in whatever naming the
//! file uses (PEFT/diffusers, BFL, kohya), and the scale facts from its metadata.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use icedit_flux::{FluxError, Stored, TensorFiles};
use serde_json::Value;

use crate::error::{AdapterError, Result};

/// Prefixes before the module path, by the tools that write them.
const MODULE_PREFIXES: [&str; 6] = [
    "transformer.",
    "base_model.model.",
    "model.diffusion_model.",
    "diffusion_model.",
    "lora_unet_",
    "lora_transformer_",
];

/// Text-encoder parts of a LoRA (kohya `lora_te*`, diffusers `text_encoder*`): not applied, since
/// icedit adapts the transformer only, and reported.
const TEXT_ENCODER_PREFIXES: [&str; 4] = ["lora_te", "text_encoder.", "text_encoder_2.", "te."];

/// The tensors one module of the file carries.
#[derive(Debug, Default)]
pub(crate) struct ModuleTensors {
    /// `lora_A` / `lora_down`, `[rank, in]`.
    pub down: Option<Tensor>,
    /// `lora_B` / `lora_up`, `[out, rank]`.
    pub up: Option<Tensor>,
    /// `lora_B.bias` (PEFT `lora_bias=True`), `[out]`.
    pub up_bias: Option<Tensor>,
    /// kohya `.alpha`.
    pub alpha: Option<f64>,
    /// MoE experts by index: (`lora_A.expert_k`, `lora_B.expert_k`).
    pub experts: BTreeMap<usize, (Option<Tensor>, Option<Tensor>)>,
    /// MoE router `[experts, in]` and its optional bias.
    pub route: Option<Tensor>,
    pub route_bias: Option<Tensor>,
    /// The file's keys for this module, for messages.
    pub keys: Vec<String>,
}

impl ModuleTensors {
    pub fn is_moe(&self) -> bool {
        self.route.is_some() || !self.experts.is_empty()
    }

    pub fn is_plain(&self) -> bool {
        self.down.is_some() || self.up.is_some()
    }
}

/// PEFT's `LoraConfig` fields that decide the scale (`lora_adapter_metadata`).
#[derive(Debug, Default, Clone)]
pub(crate) struct PeftScaling {
    pub alpha: Option<f64>,
    pub alpha_pattern: Vec<(String, f64)>,
    pub rslora: bool,
}

impl PeftScaling {
    /// `alpha / rank` (or `/ sqrt(rank)` with rsLoRA) for `module`; 1 without an alpha.
    pub fn scale(&self, module: &str, rank: usize, alpha_tensor: Option<f64>) -> f64 {
        let pattern = self
            .alpha_pattern
            .iter()
            .find(|(p, _)| module == p || module.ends_with(&format!(".{p}")))
            .map(|(_, a)| *a);
        match alpha_tensor.or(pattern).or(self.alpha) {
            None => 1.0,
            Some(alpha) if self.rslora => alpha / (rank as f64).sqrt(),
            Some(alpha) => alpha / rank as f64,
        }
    }
}

/// An adapter file, parsed: modules (in the file's naming) with their tensors.
#[derive(Debug)]
pub struct AdapterFile {
    pub(crate) path: PathBuf,
    pub(crate) modules: BTreeMap<String, ModuleTensors>,
    pub(crate) scaling: PeftScaling,
    /// MoE top-k stated in the metadata.
    pub(crate) top_k: Option<usize>,
    /// Text-encoder keys left out.
    pub(crate) text_encoder_keys: Vec<String>,
    pub(crate) metadata: HashMap<String, String>,
}

impl AdapterFile {
    /// Reads and parses a safetensors adapter file (tensors stay on the CPU in their stored
    /// dtype until they are applied).
    pub fn read(path: &Path) -> Result<Self> {
        let io = |source| AdapterError::Io {
            path: path.to_path_buf(),
            source,
        };
        let corrupt = |reason: String| AdapterError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        // The one reader of weight files (safetensors and GGUF), as the models use.
        let files = TensorFiles::open(&[path.to_path_buf()]).map_err(|e| match e {
            FluxError::Io { source, .. } => io(source),
            FluxError::Safetensors { message, .. } | FluxError::Gguf { message, .. } => {
                corrupt(message)
            }
            other => corrupt(other.to_string()),
        })?;
        let metadata = files.safetensors_metadata().cloned().unwrap_or_default();
        let mut names: Vec<&str> = files.names().collect();
        names.sort_unstable();
        let mut tensors = Vec::new();
        let mut non_finite = Vec::new();
        for name in names {
            let dtype = match files.stored(name) {
                Some(Stored::Dense(dtype @ (DType::F32 | DType::BF16 | DType::F16))) => dtype,
                other => {
                    let stored = match other {
                        Some(Stored::Dense(d)) => format!("{d:?}"),
                        Some(Stored::Quantized(q)) => format!("{q:?}"),
                        Some(Stored::Unsupported(d)) => d.to_string(),
                        None => "missing".into(),
                    };
                    return Err(AdapterError::Invalid {
                        path: path.to_path_buf(),
                        problems: vec![format!(
                            "tensor {name} is {stored}; adapters must be float32, bfloat16 or \
                             float16"
                        )],
                    });
                }
            };
            match files.read(name, None, dtype, &Device::Cpu) {
                Ok(tensor) => tensors.push((name.to_string(), tensor)),
                // Every such tensor is named at once, below.
                Err(FluxError::NonFiniteWeight { .. }) => non_finite.push(name.to_string()),
                Err(e) => return Err(corrupt(format!("tensor {name}: {e}"))),
            }
        }
        if !non_finite.is_empty() {
            return Err(AdapterError::NonFiniteTensors {
                path: path.to_path_buf(),
                keys: non_finite,
            });
        }
        Self::from_tensors(path, tensors, metadata)
    }

    pub(crate) fn from_tensors(
        path: &Path,
        tensors: Vec<(String, Tensor)>,
        metadata: HashMap<String, String>,
    ) -> Result<Self> {
        let mut modules: BTreeMap<String, ModuleTensors> = BTreeMap::new();
        let mut text_encoder_keys = Vec::new();
        let mut problems = Vec::new();
        let mut non_finite = Vec::new();
        for (key, tensor) in tensors {
            if TEXT_ENCODER_PREFIXES.iter().any(|p| key.starts_with(p)) {
                text_encoder_keys.push(key);
                continue;
            }
            // One pass over each tensor: a NaN here would turn every image black.
            if !icedit_flux::all_finite(&tensor)? {
                non_finite.push(key);
                continue;
            }
            let Some((module, part)) = split_key(&key) else {
                problems.push(format!(
                    "{key}: not a LoRA tensor this tool knows (expected lora_A/lora_B, \
                     lora_down/lora_up/alpha, or ICEdit MoE expert/route keys)"
                ));
                continue;
            };
            let entry = modules.entry(module).or_default();
            entry.keys.push(key.clone());
            let slot = match part {
                KeyPart::Down => &mut entry.down,
                KeyPart::Up => &mut entry.up,
                KeyPart::UpBias => &mut entry.up_bias,
                KeyPart::Route => &mut entry.route,
                KeyPart::RouteBias => &mut entry.route_bias,
                KeyPart::ExpertDown(k) => &mut entry.experts.entry(k).or_default().0,
                KeyPart::ExpertUp(k) => &mut entry.experts.entry(k).or_default().1,
                KeyPart::Alpha => {
                    match tensor
                        .to_dtype(DType::F64)
                        .and_then(|t| t.flatten_all())
                        .and_then(|t| t.to_vec1::<f64>())
                    {
                        Ok(v) if v.len() == 1 => entry.alpha = Some(v[0]),
                        _ => problems.push(format!("{key}: alpha must be a single number")),
                    }
                    continue;
                }
            };
            if slot.replace(tensor).is_some() {
                problems.push(format!(
                    "{key}: a second tensor for the same module and role (two namings mixed?)"
                ));
            }
        }
        if !non_finite.is_empty() {
            non_finite.sort();
            return Err(AdapterError::NonFiniteTensors {
                path: path.to_path_buf(),
                keys: non_finite,
            });
        }
        if !problems.is_empty() {
            return Err(AdapterError::Invalid {
                path: path.to_path_buf(),
                problems,
            });
        }
        let peft = peft_config(&metadata);
        let scaling = PeftScaling {
            alpha: peft.get("lora_alpha").and_then(Value::as_f64),
            alpha_pattern: peft
                .get("alpha_pattern")
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                        .collect()
                })
                .unwrap_or_default(),
            rslora: peft
                .get("use_rslora")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        };
        if peft.get("use_dora").and_then(Value::as_bool) == Some(true) {
            return Err(AdapterError::Invalid {
                path: path.to_path_buf(),
                problems: vec!["DoRA adapters (use_dora) are not supported".into()],
            });
        }
        let top_k = ["top_k", "moe_top_k", "num_experts_per_tok"]
            .iter()
            .find_map(|k| {
                metadata
                    .get(*k)
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .or_else(|| peft.get(*k).and_then(Value::as_u64).map(|v| v as usize))
            });
        Ok(Self {
            path: path.to_path_buf(),
            modules,
            scaling,
            top_k,
            text_encoder_keys,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file holds mixture-of-experts layers.
    pub fn is_moe(&self) -> bool {
        self.modules.values().any(ModuleTensors::is_moe)
    }

    /// The top-k the file's metadata states for its MoE layers.
    pub fn metadata_top_k(&self) -> Option<usize> {
        self.top_k
    }

    /// Keys of text-encoder LoRA parts, which are not applied.
    pub fn text_encoder_keys(&self) -> &[String] {
        &self.text_encoder_keys
    }

    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }
}

/// The PEFT `LoraConfig` diffusers stores as `lora_adapter_metadata`, with its `transformer.`
/// key prefix removed (keys of other components are dropped).
fn peft_config(metadata: &HashMap<String, String>) -> serde_json::Map<String, Value> {
    let Some(Value::Object(map)) = metadata
        .get("lora_adapter_metadata")
        .and_then(|s| serde_json::from_str(s).ok())
    else {
        return Default::default();
    };
    let prefixed = map.keys().any(|k| k.starts_with("transformer."));
    map.into_iter()
        .filter_map(|(k, v)| match k.strip_prefix("transformer.") {
            Some(k) => Some((k.to_string(), v)),
            None if !prefixed => Some((k, v)),
            None => None,
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum KeyPart {
    Down,
    Up,
    UpBias,
    Alpha,
    Route,
    RouteBias,
    ExpertDown(usize),
    ExpertUp(usize),
}

/// `transformer.single_transformer_blocks.0.proj_out.lora_A.expert_3.weight`
/// -> (`single_transformer_blocks.0.proj_out`, ExpertDown(3)).
fn split_key(key: &str) -> Option<(String, KeyPart)> {
    const SUFFIXES: [(&str, KeyPart); 10] = [
        (".lora_A.weight", KeyPart::Down),
        (".lora_B.weight", KeyPart::Up),
        (".lora_B.bias", KeyPart::UpBias),
        (".lora_down.weight", KeyPart::Down),
        (".lora_up.weight", KeyPart::Up),
        (".lora.down.weight", KeyPart::Down),
        (".lora.up.weight", KeyPart::Up),
        (".alpha", KeyPart::Alpha),
        (".lora_route.weight", KeyPart::Route),
        (".lora_route.bias", KeyPart::RouteBias),
    ];
    let (module, part) = SUFFIXES
        .iter()
        .find_map(|(s, p)| Some((key.strip_suffix(s)?, *p)))
        .or_else(|| {
            let rest = key.strip_suffix(".weight")?;
            let (rest, expert) = rest.rsplit_once(".expert_")?;
            let k: usize = expert.parse().ok()?;
            if let Some(m) = rest.strip_suffix(".lora_A") {
                Some((m, KeyPart::ExpertDown(k)))
            } else {
                Some((rest.strip_suffix(".lora_B")?, KeyPart::ExpertUp(k)))
            }
        })?;
    let module = MODULE_PREFIXES
        .iter()
        .find_map(|p| module.strip_prefix(p))
        .unwrap_or(module);
    (!module.is_empty()).then(|| (module.to_string(), part))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_into_module_and_role() {
        let cases = [
            (
                "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
                "transformer_blocks.0.attn.to_q",
                KeyPart::Down,
            ),
            (
                "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight",
                "double_blocks_0_img_attn_qkv",
                KeyPart::Up,
            ),
            (
                "lora_unet_single_blocks_3_linear1.alpha",
                "single_blocks_3_linear1",
                KeyPart::Alpha,
            ),
            (
                "transformer.single_transformer_blocks.1.proj_out.lora_A.expert_3.weight",
                "single_transformer_blocks.1.proj_out",
                KeyPart::ExpertDown(3),
            ),
            (
                "transformer.transformer_blocks.0.ff.net.2.lora_B.expert_0.weight",
                "transformer_blocks.0.ff.net.2",
                KeyPart::ExpertUp(0),
            ),
            (
                "transformer.transformer_blocks.0.ff.net.2.lora_route.weight",
                "transformer_blocks.0.ff.net.2",
                KeyPart::Route,
            ),
            (
                "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight",
                "double_blocks.0.img_attn.qkv",
                KeyPart::Up,
            ),
            ("x_embedder.lora_B.bias", "x_embedder", KeyPart::UpBias),
        ];
        for (key, module, part) in cases {
            assert_eq!(split_key(key), Some((module.to_string(), part)), "{key}");
        }
        for bad in [
            "transformer.x_embedder.weight",
            "transformer.x_embedder.lora_magnitude_vector",
            "lora_A.weight",
        ] {
            assert_eq!(split_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn scale_follows_peft_precedence() {
        let s = PeftScaling {
            alpha: Some(8.0),
            alpha_pattern: vec![("attn.to_q".into(), 16.0)],
            rslora: false,
        };
        assert_eq!(s.scale("transformer_blocks.0.attn.to_k", 4, None), 2.0);
        assert_eq!(s.scale("transformer_blocks.0.attn.to_q", 4, None), 4.0);
        assert_eq!(
            s.scale("transformer_blocks.0.attn.to_k", 4, Some(1.0)),
            0.25
        );
        assert_eq!(PeftScaling::default().scale("x_embedder", 4, None), 1.0);
        let rs = PeftScaling {
            alpha: Some(8.0),
            rslora: true,
            ..Default::default()
        };
        assert_eq!(rs.scale("x_embedder", 4, None), 4.0);
    }

    #[test]
    fn moe_top_k_comes_from_the_metadata() {
        let route = Tensor::zeros((4, 8), DType::F32, &Device::Cpu).unwrap();
        let tensors = || {
            vec![(
                "transformer.proj_out.lora_route.weight".to_string(),
                route.clone(),
            )]
        };
        let path = Path::new("moe.safetensors");
        let plain = HashMap::from([("top_k".to_string(), "2".to_string())]);
        let file = AdapterFile::from_tensors(path, tensors(), plain).unwrap();
        assert_eq!(file.metadata_top_k(), Some(2));
        assert!(file.is_moe());
        let peft = HashMap::from([(
            "lora_adapter_metadata".to_string(),
            r#"{"transformer.top_k": 3}"#.to_string(),
        )]);
        let file = AdapterFile::from_tensors(path, tensors(), peft).unwrap();
        assert_eq!(file.metadata_top_k(), Some(3));
        let none = AdapterFile::from_tensors(path, tensors(), HashMap::new()).unwrap();
        assert_eq!(none.metadata_top_k(), None);
    }

    #[test]
    fn diffusers_metadata_prefix_is_stripped() {
        let meta = HashMap::from([(
            "lora_adapter_metadata".to_string(),
            r#"{"transformer.r": 4, "transformer.lora_alpha": 8, "text_encoder.lora_alpha": 1}"#
                .to_string(),
        )]);
        let cfg = peft_config(&meta);
        assert_eq!(cfg.get("lora_alpha").and_then(Value::as_f64), Some(8.0));
        assert!(!cfg.contains_key("text_encoder.lora_alpha"));
    }
}
