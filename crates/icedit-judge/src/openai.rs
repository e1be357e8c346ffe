//! A judge on any OpenAI-compatible chat-completions server with vision: the prompt and the
//! three images (base64 PNG data URLs) in one user message, temperature 0, the answer parsed
//! by [`crate::parse_answer`]. Server errors (5xx), timeouts, broken connections and unusable
//! answers are retried with exponential backoff; client errors (4xx: bad key, unknown model)
//! are not, since repeating them cannot help.

use std::io::Cursor;
use std::time::{Duration, Instant};

use base64::Engine;
use image::{ImageFormat, RgbImage};
use serde_json::{json, Value};

use crate::{parse_answer, Comparison, Judge, JudgeError, Result, Verdict, PAIRWISE_TEMPLATE};

#[derive(Debug, Clone)]
pub struct OpenAiOptions {
    /// The API root (`http://localhost:8000/v1`) or the full `.../chat/completions` URL.
    pub url: String,
    /// Sent as `model`; servers that serve one model accept anything.
    pub model: Option<String>,
    pub api_key: Option<String>,
    /// Per request.
    pub timeout: Duration,
    /// Tries per comparison, the first included.
    pub attempts: usize,
    /// Wait before the second try; doubled each time.
    pub backoff: Duration,
}

impl Default for OpenAiOptions {
    fn default() -> Self {
        Self {
            url: String::new(),
            model: None,
            api_key: None,
            timeout: Duration::from_secs(120),
            attempts: 3,
            backoff: Duration::from_millis(500),
        }
    }
}

pub struct OpenAiJudge {
    options: OpenAiOptions,
    endpoint: String,
    agent: ureq::Agent,
}

enum Failure {
    /// Worth another try.
    Transient(String),
    Permanent(String),
}

impl OpenAiJudge {
    pub fn new(options: OpenAiOptions) -> Self {
        let base = options.url.trim_end_matches('/');
        let endpoint = if base.ends_with("/chat/completions") {
            base.to_string()
        } else {
            format!("{base}/chat/completions")
        };
        let agent = ureq::AgentBuilder::new().timeout(options.timeout).build();
        Self {
            options,
            endpoint,
            agent,
        }
    }

    fn request_body(&self, comparison: &Comparison) -> Value {
        let prompt = PAIRWISE_TEMPLATE.replace("{instruction}", comparison.instruction);
        let mut content = vec![json!({"type": "text", "text": prompt})];
        for image in [comparison.first, comparison.second, comparison.original] {
            content.push(json!({
                "type": "image_url",
                "image_url": {"url": format!("data:image/png;base64,{}", png_base64(image))},
            }));
        }
        json!({
            "model": self.options.model.clone().unwrap_or_else(|| "default".into()),
            "messages": [{"role": "user", "content": content}],
            "temperature": 0,
            "max_tokens": 32,
        })
    }

    fn attempt(&self, body: &Value) -> std::result::Result<(crate::Preference, String), Failure> {
        let mut request = self
            .agent
            .post(&self.endpoint)
            .set("Content-Type", "application/json");
        if let Some(key) = &self.options.api_key {
            request = request.set("Authorization", &format!("Bearer {key}"));
        }
        let response = match request.send_string(&body.to_string()) {
            Ok(r) => r,
            Err(ureq::Error::Status(code, r)) => {
                let text = r.into_string().unwrap_or_default();
                let text: String = text.chars().take(200).collect();
                let message = format!("HTTP {code}: {text}");
                return Err(if code >= 500 || code == 429 {
                    Failure::Transient(message)
                } else {
                    Failure::Permanent(message)
                });
            }
            Err(e) => return Err(Failure::Transient(e.to_string())),
        };
        let text = response
            .into_string()
            .map_err(|e| Failure::Transient(format!("reading the answer: {e}")))?;
        let answer = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| {
                v["choices"][0]["message"]["content"]
                    .as_str()
                    .map(str::to_string)
            })
            .ok_or_else(|| {
                Failure::Transient(format!(
                    "not a chat-completions response: {}",
                    text.chars().take(200).collect::<String>()
                ))
            })?;
        match parse_answer(&answer) {
            Some(p) => Ok((p, answer)),
            None => Err(Failure::Transient(format!(
                "unusable answer {:?} (expected 1 or 2)",
                answer.chars().take(200).collect::<String>()
            ))),
        }
    }
}

impl Judge for OpenAiJudge {
    fn name(&self) -> String {
        match &self.options.model {
            Some(m) => format!("openai:{}#{m}", self.options.url),
            None => format!("openai:{}", self.options.url),
        }
    }

    fn compare(&mut self, comparison: &Comparison) -> Result<Verdict> {
        let body = self.request_body(comparison);
        let start = Instant::now();
        let mut warnings = Vec::new();
        let mut wait = self.options.backoff;
        for attempt in 1..=self.options.attempts.max(1) {
            match self.attempt(&body) {
                Ok((preference, answer)) => {
                    return Ok(Verdict {
                        preference,
                        judge: self.name(),
                        answer,
                        latency: start.elapsed(),
                        warnings,
                    })
                }
                Err(Failure::Permanent(message)) => {
                    return Err(JudgeError::Failed {
                        judge: self.name(),
                        message,
                    })
                }
                Err(Failure::Transient(message)) => {
                    warnings.push(format!("{} (try {attempt}): {message}", self.name()));
                    if attempt < self.options.attempts {
                        std::thread::sleep(wait);
                        wait *= 2;
                    }
                }
            }
        }
        Err(JudgeError::Failed {
            judge: self.name(),
            message: format!(
                "no usable answer after {} tries: {}",
                self.options.attempts,
                warnings.join("; ")
            ),
        })
    }
}

fn png_base64(image: &RgbImage) -> String {
    let mut png = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
        .expect("encoding a PNG in memory cannot fail");
    base64::engine::general_purpose::STANDARD.encode(png)
}
