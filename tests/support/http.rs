//! What the server tests share: a running `icedit serve` (or `worker`), OpenAI-shaped multipart
//! forms, requests answered with status and JSON whatever the status. Included with `#[path]`.
#![allow(dead_code)] // each test file uses some of these

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `icedit serve`, stopped (SIGTERM, then waited for) when dropped.
pub struct Server {
    pub child: Child,
    pub url: String,
}

impl Server {
    pub fn start(args: &[&str]) -> Self {
        Self::start_command("serve", args, "listening on ")
    }

    /// `icedit {command} ...`, running once stderr has a line with `ready`; what follows it
    /// is the server's address.
    pub fn start_command(command: &str, args: &[&str], ready: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_icedit"))
            .arg(command)
            .args(if command == "serve" {
                &["--port", "0"][..]
            } else {
                &[]
            })
            .args(["--dtype", "f32", "--max-seq-len", "16", "--quiet"])
            .args(args)
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_HOME", std::env::temp_dir().join("icedit-serve-test-hf"))
            .env_remove("HF_HUB_CACHE")
            .stderr(Stdio::piped())
            .spawn()
            .expect("start icedit serve");
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let url = loop {
            let line = lines
                .next()
                .expect("icedit serve exited before listening")
                .unwrap();
            if let Some(at) = line.find(ready) {
                break line[at + ready.len()..].trim().to_string();
            }
        };
        // Keep draining stderr so that the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Self { child, url }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// `POST /v1/edits` with a JSON body: 202 and the job's id.
    pub fn post_job(&self, body: &str) -> String {
        let (status, json) = send(
            ureq::post(&self.url("/v1/edits")),
            Some(("application/json", body.as_bytes())),
        );
        assert_eq!(status, 202, "{json}");
        json["id"].as_str().unwrap().to_string()
    }

    /// Polls `GET /v1/jobs/{id}` (every 20 ms, for at most `limit`) until `ready` says yes;
    /// the job's JSON then.
    pub fn wait_job(
        &self,
        id: &str,
        limit: Duration,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let (status, json) = send(ureq::get(&self.url(&format!("/v1/jobs/{id}"))), None);
            assert_eq!(status, 200, "{json}");
            if ready(&json) {
                return json;
            }
            assert!(start.elapsed() < limit, "job {id}: still {json}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The job once done, failed or cancelled.
    pub fn wait_final(&self, id: &str, limit: Duration) -> serde_json::Value {
        self.wait_job(id, limit, |job| {
            ["done", "failed", "cancelled"].contains(&job["state"].as_str().unwrap_or(""))
        })
    }

    /// The job once its progress `field` (`step`, a search's `evaluations`) reaches `at_least`.
    pub fn wait_progress(&self, id: &str, field: &str, at_least: u64) -> serde_json::Value {
        self.wait_job(id, Duration::from_secs(60), |job| {
            assert!(
                job["state"] != "done",
                "finished before it was watched: {job}"
            );
            job["progress"][field]
                .as_u64()
                .is_some_and(|v| v >= at_least)
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

/// A multipart form as OpenAI's SDK sends it.
pub fn multipart(parts: &[(&str, Part)]) -> (String, Vec<u8>) {
    let boundary = "icedit-test-boundary-7f3a";
    let mut body = Vec::new();
    for (name, part) in parts {
        body.extend(format!("--{boundary}\r\n").as_bytes());
        match part {
            Part::Text(text) => {
                body.extend(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n{text}\r\n")
                        .as_bytes(),
                );
            }
            Part::File(bytes, mime) => {
                body.extend(
                    format!(
                        "Content-Disposition: form-data; name=\"{name}\"; filename=\"{name}.png\"\r\n\
                         Content-Type: {mime}\r\n\r\n"
                    )
                    .as_bytes(),
                );
                body.extend(bytes);
                body.extend(b"\r\n");
            }
        }
    }
    body.extend(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

pub enum Part {
    Text(String),
    File(Vec<u8>, &'static str),
}

pub fn text(s: &str) -> Part {
    Part::Text(s.to_string())
}

/// Status and JSON body of a request, whatever the status.
pub fn send(request: ureq::Request, body: Option<(&str, &[u8])>) -> (u16, serde_json::Value) {
    let result = match body {
        Some((content_type, bytes)) => request.set("Content-Type", content_type).send_bytes(bytes),
        None => request.call(),
    };
    let response = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{e}"),
    };
    let status = response.status();
    let mut text = String::new();
    response.into_reader().read_to_string(&mut text).unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

pub fn png_pixels(bytes: &[u8]) -> image::RgbImage {
    image::load_from_memory(bytes).unwrap().to_rgb8()
}

/// A `redis-server` of its own, without persistence, stopped when dropped; `None` (said
/// loudly) where no redis-server is installed: `.ci/run` installs it.
///
/// It listens on a Unix socket in its own folder, not on a TCP port: a port found free and
/// then handed to redis-server can be taken in between by another test's server, and two
/// tests would then share (and kill) one Redis.
pub struct RedisServer {
    child: Child,
    socket: std::path::PathBuf,
    dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("redis.sock");
        let child = match Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(&socket)
            .args([
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path())
            .arg("--logfile")
            .arg(dir.path().join("redis.log"))
            .stdout(Stdio::null())
            .spawn()
        {
            Ok(child) => child,
            Err(e) => {
                eprintln!(
                    "\n*** SKIPPED: no redis-server here ({e}); install it (apt install \
                     redis-server) to run the queue tests ***\n"
                );
                return None;
            }
        };
        let mut server = Self { child, socket, dir };
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("redis-server exited ({status}); its log:\n{}", server.log());
            }
            if server.answers_ping() {
                return Some(server);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "redis-server did not answer within 20 s; its log:\n{}",
            server.log()
        );
    }

    fn answers_ping(&self) -> bool {
        use std::io::Write;
        let Ok(mut stream) = std::os::unix::net::UnixStream::connect(&self.socket) else {
            return false;
        };
        let mut reply = [0u8; 7];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut reply).is_ok()
            && &reply == b"+PONG\r\n"
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket.display())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let exited = self.child.try_wait().ok().flatten();
        if std::thread::panicking() || exited.is_some() {
            eprintln!(
                "redis-server ({exited:?} before the end of its test); its log:\n{}",
                self.log()
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
