//! A judge on any OpenAI-compatible chat-completions server with vision: the prompt and the
//! three images (base64 PNG data URLs) in one user message, temperature 0, the answer parsed
//! by [`crate::parse_answer`]. Server errors (5xx), timeouts, broken connections and unusable
//! answers are retried with a bounded exponential backoff; client errors (4xx: bad key,
//! unknown model), refused connections and redirects are not, since repeating them cannot
//! help.
//!
//! The server is not trusted: redirects are never followed (a redirect to `file://` or to
//! another host is a failed call naming where it pointed), the answer is read up to
//! [`MAX_RESPONSE_BYTES`] within the timeout, and credentials (the URL's `user:password@`,
//! the API key) never appear in names, warnings or errors.

use std::io::{Cursor, Read};
use std::time::{Duration, Instant};

use base64::Engine;
use image::{ImageFormat, RgbImage};
use serde_json::{json, Value};

use crate::{
    parse_answer, redact_url, Comparison, Judge, JudgeError, Result, Verdict, PAIRWISE_TEMPLATE,
};

/// The longest a judge server may take per answer; longer timeouts are clamped to it.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// The most tries per comparison; more are clamped to it.
pub const MAX_TRIES: usize = 10;
/// The longest wait between two tries.
pub const MAX_BACKOFF: Duration = Duration::from_secs(4);
/// The most time spent waiting between tries of one comparison, all waits together.
pub const MAX_TOTAL_BACKOFF: Duration = Duration::from_secs(10);
/// The largest answer read from a server; a longer one is a failed call.
pub const MAX_RESPONSE_BYTES: u64 = 16 * 1024 * 1024;
/// How much of an error answer (4xx/5xx) is read, to quote its start.
const MAX_ERROR_BYTES: u64 = 64 * 1024;
/// How many characters of a server's text a message quotes.
const QUOTE_CHARS: usize = 200;

#[derive(Debug, Clone)]
pub struct OpenAiOptions {
    /// The API root (`http://localhost:8000/v1`) or the full `.../chat/completions` URL.
    /// A `user:password@` in it is sent as basic auth (unless there is an API key) and never
    /// shown.
    pub url: String,
    /// Sent as `model`; servers that serve one model accept anything.
    pub model: Option<String>,
    pub api_key: Option<String>,
    /// Per request, connecting and reading the whole answer included (at most
    /// [`MAX_TIMEOUT`]).
    pub timeout: Duration,
    /// Tries per comparison, the first included (1 to [`MAX_TRIES`]).
    pub attempts: usize,
    /// Wait before the second try; doubled each time, at most [`MAX_BACKOFF`] per wait and
    /// [`MAX_TOTAL_BACKOFF`] in all.
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
    /// Strings never to show: the API key, the URL's user info and password.
    secrets: Vec<String>,
}

enum Failure {
    /// Worth another try.
    Transient(String),
    Permanent(String),
}

impl OpenAiJudge {
    pub fn new(mut options: OpenAiOptions) -> Self {
        options.timeout = options.timeout.clamp(Duration::from_millis(1), MAX_TIMEOUT);
        options.attempts = options.attempts.clamp(1, MAX_TRIES);
        options.backoff = options.backoff.min(MAX_BACKOFF);
        let base = options.url.trim_end_matches('/');
        let endpoint = if base.ends_with("/chat/completions") {
            base.to_string()
        } else {
            format!("{base}/chat/completions")
        };
        // No redirects: ureq would follow one to any scheme (and panics on `file://`), and
        // a judge's URL is the final one anyway.
        let agent = ureq::AgentBuilder::new()
            .timeout(options.timeout)
            .redirects(0)
            .build();
        let mut secrets: Vec<String> = options.api_key.iter().cloned().collect();
        if let Some(userinfo) = url_userinfo(&options.url) {
            secrets.push(userinfo.to_string());
            if let Some((_, password)) = userinfo.split_once(':') {
                secrets.push(password.to_string());
                secrets.push(percent_decode(password));
            }
        }
        secrets.retain(|s| !s.is_empty());
        // Longest first, so that a secret containing another is hidden whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Self {
            options,
            endpoint,
            agent,
            secrets,
        }
    }

    /// `text` with every credential replaced by `***`.
    fn scrub(&self, text: &str) -> String {
        let mut text = text.to_string();
        for secret in &self.secrets {
            if text.contains(secret.as_str()) {
                text = text.replace(secret.as_str(), "***");
            }
        }
        text
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
                let text = match read_limited(r.into_reader(), MAX_ERROR_BYTES) {
                    Ok((text, _)) => quote(&text),
                    Err(e) => format!("(unreadable: {e})"),
                };
                let message = format!("HTTP {code}: {text}");
                return Err(if code >= 500 || code == 429 {
                    Failure::Transient(message)
                } else {
                    Failure::Permanent(message)
                });
            }
            Err(ureq::Error::Transport(t)) => return Err(transport_failure(&t)),
        };
        let code = response.status();
        if (300..400).contains(&code) {
            let target = match response.header("Location") {
                Some(location) => format!("to {}", describe_location(location)),
                None => "without a Location".into(),
            };
            return Err(Failure::Permanent(format!(
                "HTTP {code}: the server redirects {target}; redirects are not followed, \
                 give the judge its final URL"
            )));
        }
        if code != 200 {
            return Err(Failure::Transient(format!(
                "HTTP {code}: expected 200 with a chat-completions answer"
            )));
        }
        let text = match read_limited(response.into_reader(), MAX_RESPONSE_BYTES) {
            Ok((text, true)) => text,
            Ok((_, false)) => {
                return Err(Failure::Transient(format!(
                    "the answer is over {} MiB",
                    MAX_RESPONSE_BYTES / (1024 * 1024)
                )))
            }
            Err(e) => return Err(Failure::Transient(format!("reading the answer: {e}"))),
        };
        let answer = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| {
                v["choices"][0]["message"]["content"]
                    .as_str()
                    .map(str::to_string)
            })
            .ok_or_else(|| {
                Failure::Transient(format!("not a chat-completions response: {}", quote(&text)))
            })?;
        match parse_answer(&answer) {
            Some(p) => Ok((p, answer)),
            None => Err(Failure::Transient(format!(
                "unusable answer {:?} (expected 1 or 2)",
                answer.chars().take(QUOTE_CHARS).collect::<String>()
            ))),
        }
    }
}

impl Judge for OpenAiJudge {
    /// `openai:URL[#MODEL]`, any `user:password@` in the URL shown as `***@`.
    fn name(&self) -> String {
        let url = redact_url(&self.options.url);
        match &self.options.model {
            Some(m) => format!("openai:{url}#{m}"),
            None => format!("openai:{url}"),
        }
    }

    fn compare(&mut self, comparison: &Comparison) -> Result<Verdict> {
        let body = self.request_body(comparison);
        let start = Instant::now();
        let mut warnings = Vec::new();
        let mut wait = self.options.backoff;
        let mut waited = Duration::ZERO;
        let attempts = self.options.attempts;
        let mut tries = 0;
        for attempt in 1..=attempts {
            tries = attempt;
            match self.attempt(&body) {
                Ok((preference, answer)) => {
                    return Ok(Verdict {
                        preference,
                        judge: self.name(),
                        answer: self.scrub(&answer),
                        latency: start.elapsed(),
                        warnings,
                    })
                }
                Err(Failure::Permanent(message)) => {
                    return Err(JudgeError::Failed {
                        judge: self.name(),
                        message: self.scrub(&message),
                    });
                }
                Err(Failure::Transient(message)) => {
                    warnings
                        .push(self.scrub(&format!("{} (try {attempt}): {message}", self.name())));
                    if attempt < attempts {
                        let pause = wait.min(MAX_TOTAL_BACKOFF.saturating_sub(waited));
                        if pause.is_zero() && !wait.is_zero() {
                            // The time for waiting is used up: no more tries.
                            break;
                        }
                        std::thread::sleep(pause);
                        waited += pause;
                        wait = (wait * 2).min(MAX_BACKOFF);
                    }
                }
            }
        }
        Err(JudgeError::Failed {
            judge: self.name(),
            message: format!(
                "no usable answer after {tries} {}: {}",
                if tries == 1 { "try" } else { "tries" },
                warnings.join("; ")
            ),
        })
    }
}

/// A failed connection, in words without the URL (ureq's own message names it, with any
/// credentials). Refused connections and unknown hosts fail at once.
fn transport_failure(t: &ureq::Transport) -> Failure {
    use std::error::Error as _;
    let mut message = t.kind().to_string();
    if let Some(m) = t.message() {
        message = format!("{message}: {m}");
    }
    let mut refused = false;
    let mut source = t.source();
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            refused |= io.kind() == std::io::ErrorKind::ConnectionRefused;
        }
        message = format!("{message}: {e}");
        source = e.source();
    }
    match t.kind() {
        _ if refused => Failure::Permanent("connection refused (is the server up?)".into()),
        ureq::ErrorKind::Dns
        | ureq::ErrorKind::InvalidUrl
        | ureq::ErrorKind::UnknownScheme
        | ureq::ErrorKind::InsecureRequestHttpsOnly
        | ureq::ErrorKind::InvalidProxyUrl
        | ureq::ErrorKind::ProxyConnect
        | ureq::ErrorKind::ProxyUnauthorized => Failure::Permanent(message),
        _ => Failure::Transient(message),
    }
}

/// Reads at most `limit` bytes: the text (lossy UTF-8), and whether that was all of it.
fn read_limited(reader: impl Read, limit: u64) -> std::io::Result<(String, bool)> {
    let mut bytes = Vec::new();
    reader.take(limit + 1).read_to_end(&mut bytes)?;
    let complete = bytes.len() as u64 <= limit;
    bytes.truncate(limit as usize);
    Ok((String::from_utf8_lossy(&bytes).into_owned(), complete))
}

/// The start of a server's text, on one line, without control characters (a hostile server
/// must not drive the terminal).
fn quote(text: &str) -> String {
    let mut quoted: String = text
        .chars()
        .take(QUOTE_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().nth(QUOTE_CHARS).is_some() {
        quoted.push('…');
    }
    quoted
}

/// Where a redirect points: its scheme and host, never a user name or password, nor the
/// path (which may hold a token).
fn describe_location(location: &str) -> String {
    let location = location.trim();
    let Some((scheme, rest)) = location.split_once("://") else {
        return "a relative location on the same server".into();
    };
    let scheme: String = scheme
        .chars()
        .take(20)
        .filter(|c| c.is_ascii_alphanumeric() || "+-.".contains(*c))
        .collect();
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host: String = host
        .chars()
        .take(100)
        .filter(|c| c.is_ascii_alphanumeric() || "-.:[]_".contains(*c))
        .collect();
    if host.is_empty() {
        format!("a {scheme}:// URL")
    } else {
        format!("{scheme}://{host}")
    }
}

/// The `user:password` of `scheme://user:password@host/...`, if any.
fn url_userinfo(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    authority.rsplit_once('@').map(|(userinfo, _)| userinfo)
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn png_base64(image: &RgbImage) -> String {
    let mut png = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
        .expect("encoding a PNG in memory cannot fail");
    base64::engine::general_purpose::STANDARD.encode(png)
}
