//! Judges for the early-filter seed search: given an instruction, two edited previews and the
//! original, say which edit is better. ICEdit used a vision-language model for this; any
//! OpenAI-compatible chat-completions server with vision works here (vLLM, llama.cpp server,
//! Ollama, LM Studio, hosted APIs). Judges are chained: one that cannot give a usable answer
//! after its retries hands over to the next, with a warning, and the search never crashes on
//! a judge.

pub mod fake_server;
mod openai;

use std::time::{Duration, Instant};

use image::RgbImage;

pub use openai::{OpenAiJudge, OpenAiOptions};

/// The pairwise judge prompt (prompts/judge-pairwise.txt), `{instruction}` filled in.
pub const PAIRWISE_TEMPLATE: &str = include_str!("../../../prompts/judge-pairwise.txt");

#[derive(Debug, thiserror::Error)]
pub enum JudgeError {
    #[error("judge spec `{spec}`: {message}")]
    Spec { spec: String, message: String },
    #[error("{judge}: {message}")]
    Failed { judge: String, message: String },
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

pub trait Judge {
    fn name(&self) -> String;
    /// Which of the two edits is better; an error once the judge has given up.
    fn compare(&mut self, comparison: &Comparison) -> Result<Verdict>;
}

/// Judges tried in order: the first usable answer counts. When all fail, the first edit (the
/// running best) is kept and the verdict says so, so that a search always finishes.
pub struct JudgeChain {
    judges: Vec<Box<dyn Judge>>,
}

impl JudgeChain {
    pub fn new(judges: Vec<Box<dyn Judge>>) -> Self {
        Self { judges }
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
        let mut warnings = Vec::new();
        for judge in &mut self.judges {
            match judge.compare(comparison) {
                Ok(mut verdict) => {
                    warnings.append(&mut verdict.warnings);
                    verdict.warnings = warnings;
                    return Ok(verdict);
                }
                Err(e) => warnings.push(format!("{e}; trying the next judge")),
            }
        }
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

/// Builds the judges of a `--judge` list, e.g. `openai:http://localhost:8000/v1#qwen2.5-vl,...`.
/// `lookup` reads environment variables (the API key: `ICEDIT_JUDGE_API_KEY`, else
/// `OPENAI_API_KEY`); `defaults` gives timeouts and retries.
pub fn parse_judges(
    spec: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    defaults: &OpenAiOptions,
) -> Result<JudgeChain> {
    let mut judges: Vec<Box<dyn Judge>> = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = |message: String| JudgeError::Spec {
            spec: part.to_string(),
            message,
        };
        if let Some(rest) = part.strip_prefix("openai:") {
            let (url, model) = match rest.split_once('#') {
                Some((u, m)) => (u, Some(m.to_string())),
                None => (rest, None),
            };
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(bad(
                    "give the server's URL, e.g. openai:http://localhost:8000/v1#MODEL".into(),
                ));
            }
            let api_key = lookup("ICEDIT_JUDGE_API_KEY").or_else(|| lookup("OPENAI_API_KEY"));
            judges.push(Box::new(OpenAiJudge::new(OpenAiOptions {
                url: url.to_string(),
                model,
                api_key,
                ..defaults.clone()
            })));
        } else {
            return Err(bad(format!(
                "unknown judge; available: openai:URL[#MODEL] (any OpenAI-compatible vision \
                 server). Separate fallbacks with commas. (got `{part}`)"
            )));
        }
    }
    if judges.is_empty() {
        return Err(JudgeError::Spec {
            spec: spec.to_string(),
            message: "no judge given".into(),
        });
    }
    Ok(JudgeChain::new(judges))
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
    fn specs_parse_with_keys_from_the_environment() {
        let env = |k: &str| (k == "OPENAI_API_KEY").then(|| "sk-test".to_string());
        let d = OpenAiOptions::default();
        let chain = parse_judges("openai:http://127.0.0.1:9/v1#qwen", &env, &d).unwrap();
        assert_eq!(chain.name(), "openai:http://127.0.0.1:9/v1#qwen");
        assert!(parse_judges("openai:localhost:8000", &env, &d).is_err());
        let err = parse_judges("gpt", &env, &d).err().unwrap().to_string();
        assert!(err.contains("openai:URL"), "{err}");
        assert!(parse_judges(" , ", &env, &d).is_err());
    }
}
