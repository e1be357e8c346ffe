//! Judges for the early-filter seed search: given an instruction, two edited previews and the
//! original, say which edit is better. ICEdit used a vision-language model for this. Here it
//! can be any OpenAI-compatible chat-completions server with vision (vLLM, llama.cpp server,
//! Ollama, LM Studio, hosted APIs), Qwen3-VL in-process ([`qwen3_vl`], [`VlmJudge`]), or CLIP
//! in-process ([`ClipJudge`]). Judges are chained: one that cannot give a usable answer after
//! its retries hands over to the next, with a warning, and the search never crashes on a judge.

mod clip;
pub mod fake_server;
mod openai;
pub mod qwen3_vl;
mod vlm;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use icedit_hub::{HubOptions, ModelRepo};
use image::RgbImage;

use clip::CLIP_FILES;
pub use clip::{
    ClipEmbedder, ClipJudge, ClipPreprocess, ClipScore, ClipScoring, DEFAULT_CLIP_MODEL,
};
pub use openai::{
    OpenAiJudge, OpenAiOptions, MAX_BACKOFF, MAX_RESPONSE_BYTES, MAX_TIMEOUT, MAX_TOTAL_BACKOFF,
    MAX_TRIES,
};
use vlm::VLM_FILES;
pub use vlm::{VlmJudge, VlmPreprocess, DEFAULT_VLM_MODEL};

/// The pairwise judge prompt (prompts/judge-pairwise.txt), `{instruction}` filled in.
pub const PAIRWISE_TEMPLATE: &str = include_str!("../../../prompts/judge-pairwise.txt");

#[derive(Debug, thiserror::Error)]
pub enum JudgeError {
    #[error("judge spec `{spec}`: {message}")]
    Spec { spec: String, message: String },
    #[error("{judge}: {message}")]
    Failed { judge: String, message: String },
    #[error("judge {judge}: cannot load the model in {path}: {message}")]
    Load {
        judge: String,
        path: PathBuf,
        message: String,
    },
    /// Every judge of a chain failed; one line per judge, saying why.
    #[error("no judge gave a usable answer; tried:\n  - {}", failures.join("\n  - "))]
    NoAnswer { failures: Vec<String> },
    #[error("judge computation failed: {0}")]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, JudgeError>;

/// One comparison, in the order the judge sees the images: edited A, edited B, original.
pub struct Comparison<'a> {
    pub instruction: &'a str,
    pub first: &'a RgbImage,
    pub second: &'a RgbImage,
    pub original: &'a RgbImage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preference {
    First,
    Second,
}

/// A judge's answer with what it cost.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub preference: Preference,
    /// Which judge answered (after fallbacks).
    pub judge: String,
    /// The judge's own words, for the record.
    pub answer: String,
    pub latency: Duration,
    /// Problems met on the way (retries, fallbacks), for the user.
    pub warnings: Vec<String>,
}

/// `Send`: a server's engine thread owns its judge.
pub trait Judge: Send {
    fn name(&self) -> String;
    /// Which of the two edits is better; an error once the judge has given up.
    fn compare(&mut self, comparison: &Comparison) -> Result<Verdict>;
}

/// Judges tried in order: the first usable answer counts. When all fail, the first edit (the
/// running best) is kept and the verdict says so, so that a search always finishes
/// ([`JudgeChain::compare_strict`] fails instead).
pub struct JudgeChain {
    judges: Vec<Box<dyn Judge>>,
}

impl JudgeChain {
    pub fn new(judges: Vec<Box<dyn Judge>>) -> Self {
        Self { judges }
    }

    /// The first usable answer, or [`JudgeError::NoAnswer`] naming each judge and why it
    /// failed: for trying a judge setup, where keeping the first edit would hide the failure.
    pub fn compare_strict(&mut self, comparison: &Comparison) -> Result<Verdict> {
        self.first_answer(comparison)
            .map_err(|(_, failures)| JudgeError::NoAnswer { failures })
    }

    /// The first usable answer (with the earlier judges' failures among its warnings), or the
    /// warnings and the failures.
    fn first_answer(
        &mut self,
        comparison: &Comparison,
    ) -> std::result::Result<Verdict, (Vec<String>, Vec<String>)> {
        let mut warnings = Vec::new();
        let mut failures = Vec::new();
        for judge in &mut self.judges {
            match judge.compare(comparison) {
                Ok(mut verdict) => {
                    warnings.append(&mut verdict.warnings);
                    verdict.warnings = warnings;
                    return Ok(verdict);
                }
                Err(e) => {
                    warnings.push(format!("{e}; trying the next judge"));
                    failures.push(e.to_string());
                }
            }
        }
        Err((warnings, failures))
    }
}

impl Judge for JudgeChain {
    fn name(&self) -> String {
        self.judges
            .iter()
            .map(|j| j.name())
            .collect::<Vec<_>>()
            .join(",")
    }

    fn compare(&mut self, comparison: &Comparison) -> Result<Verdict> {
        let start = Instant::now();
        let mut warnings = match self.first_answer(comparison) {
            Ok(verdict) => return Ok(verdict),
            Err((warnings, _)) => warnings,
        };
        warnings.push("no judge gave a usable answer: keeping the first edit".into());
        Ok(Verdict {
            preference: Preference::First,
            judge: "none".into(),
            answer: String::new(),
            latency: start.elapsed(),
            warnings,
        })
    }
}

/// Reads a judge's answer: `1` / `2`, `Image 2`, `{"choice": 1}`, `The second image is better`.
/// `None` when the answer names both or neither.
pub fn parse_answer(text: &str) -> Option<Preference> {
    let from_number = |n: u64| match n {
        1 => Some(Preference::First),
        2 => Some(Preference::Second),
        _ => None,
    };
    // JSON, possibly inside a code fence.
    let trimmed = text
        .trim()
        .trim_start_matches("```json")
        .trim_start_matches("```")
        .trim_end_matches("```")
        .trim();
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_str(trimmed) {
        for key in ["choice", "answer", "better", "winner", "best", "image"] {
            let found = match map.get(key) {
                Some(serde_json::Value::Number(n)) => n.as_u64().and_then(from_number),
                Some(serde_json::Value::String(s)) => parse_answer(s),
                _ => None,
            };
            if found.is_some() {
                return found;
            }
        }
        return None;
    }
    let lower = text.to_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let mut found = None;
    for word in words {
        let this = match word {
            "1" | "first" | "one" => Some(Preference::First),
            "2" | "second" | "two" => Some(Preference::Second),
            _ => None,
        };
        match (found, this) {
            (_, None) => {}
            (None, Some(p)) => found = Some(p),
            (Some(a), Some(b)) if a == b => {}
            _ => return None,
        }
    }
    found
}

/// One judge of a `--judge` list, parsed but not yet built (building may load a model).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JudgeSpec {
    /// `openai:URL[#MODEL]`.
    OpenAi { url: String, model: Option<String> },
    /// `clip[:MODEL]`: a Hub repo id or a local folder.
    Clip { model: String },
    /// `qwen3-vl[:MODEL]`: a Hub repo id or a local folder.
    Vlm { model: String },
}

impl JudgeSpec {
    /// How verdicts name the judge; a server URL's `user:password@` shows as `***@`.
    pub fn name(&self) -> String {
        match self {
            JudgeSpec::OpenAi { url, model: None } => format!("openai:{}", redact_url(url)),
            JudgeSpec::OpenAi {
                url,
                model: Some(m),
            } => format!("openai:{}#{m}", redact_url(url)),
            JudgeSpec::Clip { model } => format!("clip:{model}"),
            JudgeSpec::Vlm { model } => format!("qwen3-vl:{model}"),
        }
    }
}

/// Parses a `--judge` list, e.g. `openai:http://localhost:8000/v1#qwen2.5-vl,clip`: every
/// entry is checked before any judge is built, so that a typo fails before any work.
pub fn parse_judges(spec: &str) -> Result<Vec<JudgeSpec>> {
    let mut specs = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        // As errors show it: without credentials.
        let shown = match part.split_once(':') {
            Some((kind, rest)) => format!("{kind}:{}", redact_url(rest)),
            None => part.to_string(),
        };
        let bad = |message: String| JudgeError::Spec {
            spec: shown.clone(),
            message,
        };
        let (kind, rest) = match part.split_once(':') {
            Some((k, r)) => (k, Some(r)),
            None => (part, None),
        };
        match (kind, rest) {
            ("openai", Some(rest)) => {
                let (url, model) = match rest.split_once('#') {
                    Some((u, m)) => (u, Some(m.to_string())),
                    None => (rest, None),
                };
                if model.as_deref().is_some_and(|m| m.contains('@')) {
                    // `http://user:pa#ss@host`: the `#` cut a password.
                    return Err(JudgeError::Spec {
                        spec: "openai:…".into(),
                        message: "a `#` in the URL's user name or password must be written \
                                  %23 (`#` starts the model name)"
                            .into(),
                    });
                }
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(bad(
                        "give the server's URL, e.g. openai:http://localhost:8000/v1#MODEL".into(),
                    ));
                }
                specs.push(JudgeSpec::OpenAi {
                    url: url.to_string(),
                    model,
                });
            }
            ("clip" | "qwen3-vl", rest) => {
                let default = if kind == "clip" {
                    DEFAULT_CLIP_MODEL
                } else {
                    DEFAULT_VLM_MODEL
                };
                let model = rest.map(str::trim).unwrap_or(default);
                if model.is_empty() {
                    return Err(bad(format!(
                        "name the model after `{kind}:`, or write `{kind}` for {default}"
                    )));
                }
                let model = model.to_string();
                specs.push(if kind == "clip" {
                    JudgeSpec::Clip { model }
                } else {
                    JudgeSpec::Vlm { model }
                });
            }
            _ => {
                return Err(bad(format!(
                    "unknown judge; available: openai:URL[#MODEL] (any OpenAI-compatible vision \
                     server), clip[:MODEL] (CLIP in-process, default {DEFAULT_CLIP_MODEL}), \
                     qwen3-vl[:MODEL] (Qwen3-VL in-process, default {DEFAULT_VLM_MODEL}). \
                     Separate fallbacks with commas. (got `{shown}`)"
                )))
            }
        }
    }
    if specs.is_empty() {
        return Err(JudgeError::Spec {
            spec: spec.to_string(),
            message: "no judge given".into(),
        });
    }
    Ok(specs)
}

/// `url` with any `user:password@` before its host shown as `***@`
/// (`http://***@host:8000/v1`), for names, logs and errors.
pub fn redact_url(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[start..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => format!("{}***{}", &url[..start], &rest[at..]),
        None => url.to_string(),
    }
}

/// What building judges needs besides their specs.
pub struct JudgeSettings<'a> {
    /// Reads environment variables (the API key: `ICEDIT_JUDGE_API_KEY`, else
    /// `OPENAI_API_KEY`).
    pub lookup: &'a dyn Fn(&str) -> Option<String>,
    /// Timeouts and retries of the OpenAI-compatible judges.
    pub openai: OpenAiOptions,
    /// Where in-process judges' models come from.
    pub hub: HubOptions,
    /// Where in-process judges run; the vision-language model in `dtype` (CLIP is small
    /// and runs in f32).
    pub device: Device,
    pub dtype: DType,
    pub clip: ClipScoring,
}

/// Builds the judges of a parsed list, in order, as one chain; in-process judges load their
/// models now (from the Hub cache or a folder), so a missing model fails here.
pub fn build_judges(specs: &[JudgeSpec], settings: &JudgeSettings) -> Result<JudgeChain> {
    let mut judges: Vec<Box<dyn Judge>> = Vec::new();
    for spec in specs {
        match spec {
            JudgeSpec::OpenAi { url, model } => {
                let lookup = settings.lookup;
                let api_key = lookup("ICEDIT_JUDGE_API_KEY").or_else(|| lookup("OPENAI_API_KEY"));
                judges.push(Box::new(OpenAiJudge::new(OpenAiOptions {
                    url: url.clone(),
                    model: model.clone(),
                    api_key,
                    ..settings.openai.clone()
                })));
            }
            JudgeSpec::Clip { model } => {
                let (_, dir) = fetch_model(spec, model, CLIP_FILES, &settings.hub)?;
                judges.push(Box::new(ClipJudge::load(
                    spec.name(),
                    &dir,
                    settings.clip.clone(),
                    &settings.device,
                )?));
            }
            JudgeSpec::Vlm { model } => {
                let (repo, dir) = fetch_model(spec, model, VLM_FILES, &settings.hub)?;
                fetch_weights(spec, &repo)?;
                judges.push(Box::new(VlmJudge::load(
                    spec.name(),
                    &dir,
                    settings.dtype,
                    &settings.device,
                )?));
            }
        }
    }
    Ok(JudgeChain::new(judges))
}

/// The folder holding a model's files (a local folder, or the Hub cache's snapshot after the
/// missing files are downloaded): every required file, and the optional ones it has.
fn fetch_model(
    spec: &JudgeSpec,
    model: &str,
    (required, optional): (&[&str], &[&str]),
    hub: &HubOptions,
) -> Result<(ModelRepo, PathBuf)> {
    let fail = |e: icedit_hub::HubError| JudgeError::Spec {
        spec: spec.name(),
        message: format!("cannot get the model {model}: {e}"),
    };
    let repo = ModelRepo::open(model, hub).map_err(fail)?;
    let mut names: Vec<&str> = required.to_vec();
    for name in optional {
        if repo.exists(name).map_err(fail)? {
            names.push(name);
        }
    }
    let paths = repo.files(&names).map_err(fail)?;
    let dir = paths[0]
        .parent()
        .expect("a model file lies in a folder")
        .to_path_buf();
    Ok((repo, dir))
}

/// The model's weights: `model.safetensors`, or the shards its `model.safetensors.index.json`
/// names (fetched as the Hub crate reads the index).
fn fetch_weights(spec: &JudgeSpec, repo: &ModelRepo) -> Result<()> {
    repo.safetensors_set("", "model")
        .map_err(|e| JudgeError::Spec {
            spec: spec.name(),
            message: format!("cannot get the weights: {e}"),
        })
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_robustly() {
        use Preference::*;
        let cases = [
            ("1", Some(First)),
            ("2", Some(Second)),
            (" 2.\n", Some(Second)),
            ("Image 2", Some(Second)),
            ("Answer: image 1", Some(First)),
            ("The second edit is better.", Some(Second)),
            (r#"{"choice": 2}"#, Some(Second)),
            ("```json\n{\"better\": \"1\"}\n```", Some(First)),
            (r#"{"winner": "Image 2"}"#, Some(Second)),
            (
                "Image 1 is sharper but image 2 follows the instruction",
                None,
            ),
            ("I cannot tell", None),
            ("", None),
            ("12", None),
            (r#"{"reason": "both fine"}"#, None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_answer(text), expected, "{text:?}");
        }
    }

    #[test]
    fn template_names_the_criteria_and_the_order() {
        assert!(PAIRWISE_TEMPLATE.contains("{instruction}"));
        assert!(PAIRWISE_TEMPLATE.contains("Image 3 is the original"));
    }

    #[test]
    fn specs_parse_and_build_with_keys_from_the_environment() {
        let specs = parse_judges("openai:http://127.0.0.1:9/v1#qwen, clip").unwrap();
        assert_eq!(
            specs,
            [
                JudgeSpec::OpenAi {
                    url: "http://127.0.0.1:9/v1".into(),
                    model: Some("qwen".into())
                },
                JudgeSpec::Clip {
                    model: DEFAULT_CLIP_MODEL.into()
                }
            ]
        );
        assert_eq!(
            parse_judges("clip:/models/clip").unwrap()[0].name(),
            "clip:/models/clip"
        );
        assert!(parse_judges("openai:localhost:8000").is_err());
        assert!(parse_judges("clip:").is_err());
        let err = parse_judges("gpt").err().unwrap().to_string();
        assert!(
            err.contains("openai:URL") && err.contains("clip[:MODEL]"),
            "{err}"
        );
        assert!(parse_judges(" , ").is_err());

        let env = |k: &str| (k == "OPENAI_API_KEY").then(|| "sk-test".to_string());
        let settings = JudgeSettings {
            lookup: &env,
            openai: OpenAiOptions::default(),
            hub: HubOptions::new(std::env::temp_dir()).with_offline(true),
            device: Device::Cpu,
            dtype: DType::F32,
            clip: ClipScoring::default(),
        };
        let chain = build_judges(&specs[..1], &settings).unwrap();
        assert_eq!(chain.name(), "openai:http://127.0.0.1:9/v1#qwen");
    }
}
