//! A scripted OpenAI-compatible chat-completions server on 127.0.0.1, for tests and demos
//! of the judge without a model: it answers each request from a script and records what it
//! received. The script may also misbehave as a hostile or broken server would: redirect
//! anywhere, never answer, answer garbage or an endless body.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

/// What the server answers to one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// HTTP 200 with this assistant message.
    Answer(&'static str),
    Status(u16),
    /// Waits this long, then answers.
    Slow(Duration, &'static str),
    /// This redirect status (301, 302, 307, 308) to this `Location`.
    Redirect(u16, &'static str),
    /// Reads the request, then sends nothing for this long before closing the connection.
    Silent(Duration),
    /// HTTP 200 with this body as it is (HTML, broken JSON...).
    Raw(&'static str),
    /// HTTP 200 with a body of this many bytes (a valid JSON string, never closed).
    Huge(u64),
    /// HTTP 200 with a body that never ends (no length; bytes until the client leaves).
    Endless,
    /// HTTP 200 with a body sent one byte per interval, forever.
    Drip(Duration),
    /// HTTP 500 whose body is the `Authorization` header received, as a server leaking
    /// credentials into its errors would.
    EchoAuthorization,
}

pub struct Received {
    pub authorization: Option<String>,
    pub body: Value,
}

/// Starts a server answering with the scripted replies in order (the last one repeats);
/// returns its API root (`http://127.0.0.1:PORT/v1`) and the log of requests.
pub fn serve(script: Vec<Reply>) -> (String, Arc<Mutex<Vec<Received>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let received = Arc::new(Mutex::new(Vec::new()));
    let log = received.clone();
    std::thread::spawn(move || {
        for (i, stream) in listener.incoming().enumerate() {
            let Ok(mut stream) = stream else { return };
            let (log, script) = (log.clone(), script.clone());
            // One thread per request, so that a slow reply does not hold up the retries.
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                reader.read_line(&mut request_line).unwrap();
                assert!(
                    request_line.starts_with("POST /v1/chat/completions "),
                    "{request_line}"
                );
                let (mut length, mut authorization) = (0, None);
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    let line = line.trim_end();
                    if line.is_empty() {
                        break;
                    }
                    let (name, value) = line.split_once(": ").unwrap();
                    match name.to_ascii_lowercase().as_str() {
                        "content-length" => length = value.parse().unwrap(),
                        "authorization" => authorization = Some(value.to_string()),
                        _ => {}
                    }
                }
                let mut body = vec![0u8; length];
                reader.read_exact(&mut body).unwrap();
                log.lock().unwrap().push(Received {
                    authorization: authorization.clone(),
                    body: serde_json::from_slice(&body).unwrap(),
                });
                let reply = script[i.min(script.len() - 1)].clone();
                let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n";
                let (status, content) = match reply {
                    Reply::Answer(text) => (200, text),
                    Reply::Status(code) => (code, "server trouble"),
                    Reply::Slow(wait, text) => {
                        std::thread::sleep(wait);
                        (200, text)
                    }
                    Reply::Redirect(code, location) => {
                        let _ = write!(
                            stream,
                            "HTTP/1.1 {code} Moved\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        );
                        return;
                    }
                    Reply::Silent(wait) => {
                        std::thread::sleep(wait);
                        return;
                    }
                    Reply::Raw(body) => {
                        let _ = write!(
                            stream,
                            "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        return;
                    }
                    Reply::Huge(length) => {
                        let _ = write!(
                            stream,
                            "{head}Content-Length: {length}\r\nConnection: close\r\n\r\n\""
                        );
                        let chunk = vec![b'a'; 64 * 1024];
                        let mut left = length.saturating_sub(1);
                        while left > 0 {
                            let n = left.min(chunk.len() as u64) as usize;
                            if stream.write_all(&chunk[..n]).is_err() {
                                return;
                            }
                            left -= n as u64;
                        }
                        return;
                    }
                    Reply::Endless => {
                        let _ = write!(stream, "{head}Connection: close\r\n\r\n\"");
                        let chunk = vec![b'a'; 64 * 1024];
                        while stream.write_all(&chunk).is_ok() {}
                        return;
                    }
                    Reply::Drip(every) => {
                        let _ = write!(stream, "{head}Connection: close\r\n\r\n");
                        while stream.write_all(b" ").and_then(|_| stream.flush()).is_ok() {
                            std::thread::sleep(every);
                        }
                        return;
                    }
                    Reply::EchoAuthorization => {
                        let body =
                            format!("bad credentials: {}", authorization.unwrap_or_default());
                        let _ = write!(
                            stream,
                            "HTTP/1.1 500 X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        return;
                    }
                };
                let payload = if status == 200 {
                    json!({"choices": [{"message": {"role": "assistant", "content": content}}]})
                        .to_string()
                } else {
                    json!({"error": {"message": content}}).to_string()
                };
                let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}",
                payload.len()
            );
            });
        }
    });
    (url, received)
}
