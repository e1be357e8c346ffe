//! Test fixtures: a fake Hugging Face cache on disk, and a fake Hub on localhost.
#![allow(dead_code)] // each test binary uses a different part

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use icedit_hub::HubOptions;

pub const FLUX: &str = "black-forest-labs/FLUX.1-Fill-dev";
pub const COMMIT_MAIN: &str = "1111111111111111111111111111111111111111";
pub const COMMIT_V1: &str = "2222222222222222222222222222222222222222";
pub const COMMIT_PINNED: &str = "3333333333333333333333333333333333333333";

/// A cache laid out as `huggingface_hub` writes it: contents in `blobs/`, snapshot
/// entries as relative symlinks to them, branches in `refs/`.
pub struct FakeCache {
    root: tempfile::TempDir,
}

impl FakeCache {
    pub fn new() -> Self {
        Self {
            root: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// The temp folder that holds the cache folder (and nothing else).
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// The hub cache folder (what HF_HUB_CACHE would name).
    pub fn dir(&self) -> PathBuf {
        self.root.path().join("hub")
    }

    pub fn repo_dir(&self, repo_id: &str) -> PathBuf {
        self.dir()
            .join(format!("models--{}", repo_id.replace('/', "--")))
    }

    /// Offline options on this cache, nothing from the real environment.
    pub fn offline(&self) -> HubOptions {
        HubOptions::new(self.dir()).with_offline(true)
    }

    /// Stores `contents` as `relative` in snapshot `commit`.
    pub fn add(&self, repo_id: &str, commit: &str, relative: &str, contents: &[u8]) {
        let repo_dir = self.repo_dir(repo_id);
        let blob_name = fake_etag(contents);
        let blob = repo_dir.join("blobs").join(&blob_name);
        std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
        std::fs::write(&blob, contents).unwrap();

        let entry = repo_dir.join("snapshots").join(commit).join(relative);
        std::fs::create_dir_all(entry.parent().unwrap()).unwrap();
        link_or_copy(&blob, &entry, relative);
    }

    /// Points branch or tag `name` at `commit` (written with a trailing newline, which
    /// readers must tolerate).
    pub fn set_ref(&self, repo_id: &str, name: &str, commit: &str) {
        let path = self.repo_dir(repo_id).join("refs").join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, format!("{commit}\n")).unwrap();
    }

    /// Every file under the cache, relative, for "nothing was left behind" checks.
    pub fn all_files(&self) -> Vec<String> {
        walk(self.root.path())
    }
}

fn link_or_copy(blob: &Path, entry: &Path, relative: &str) {
    #[cfg(unix)]
    {
        // snapshots/{commit}/{relative} -> ../../blobs/{etag}, one more `..` per folder.
        let depth = relative.matches('/').count() + 2;
        let target = PathBuf::from("../".repeat(depth))
            .join("blobs")
            .join(blob.file_name().unwrap());
        std::os::unix::fs::symlink(target, entry).unwrap();
    }
    #[cfg(not(unix))]
    {
        let _ = relative;
        std::fs::copy(blob, entry).unwrap();
    }
}

pub fn fake_etag(contents: &[u8]) -> String {
    let mut hasher = DefaultHasher::new();
    contents.hash(&mut hasher);
    format!("{:016x}{:08x}", hasher.finish(), contents.len())
}

pub fn walk(dir: &Path) -> Vec<String> {
    fn visit(dir: &Path, root: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                visit(&path, root, out);
            } else {
                let relative = path.strip_prefix(root).unwrap();
                out.push(relative.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    let mut out = Vec::new();
    visit(dir, dir, &mut out);
    out.sort();
    out
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).expect("readable file")
}

/// Online tests must never leave the machine: a proxy from the environment would take
/// even localhost requests elsewhere, so those tests skip themselves then.
pub fn proxy_configured() -> bool {
    ["ALL_PROXY", "HTTPS_PROXY", "HTTP_PROXY"]
        .iter()
        .any(|name| {
            std::env::var_os(name).is_some() || std::env::var_os(name.to_lowercase()).is_some()
        })
}

/// One file the fake Hub serves.
#[derive(Clone)]
pub struct FakeFile {
    pub contents: Vec<u8>,
    /// Close the connection after this many body bytes (a dropped download).
    pub cut_after: Option<usize>,
    /// Header values a hostile or broken Hub sends instead of the right ones.
    pub hostile: Hostile,
}

/// What a hostile Hub (or someone on the path of a plain-http mirror) answers for a file.
/// `None` fields keep the genuine answer.
#[derive(Clone, Default)]
pub struct Hostile {
    /// The raw `ETag` header.
    pub etag: Option<String>,
    /// An `X-Linked-Etag` header (none by default).
    pub linked_etag: Option<String>,
    /// The raw `X-Repo-Commit` header.
    pub commit: Option<String>,
    /// An `X-Linked-Size` header (none by default).
    pub linked_size: Option<String>,
    /// Answer `302` with this `Location` (to `HEAD` and `GET`, or only to `GET`);
    /// `{endpoint}` in it is replaced by the fake Hub's address. The fake Hub serves every
    /// file's bare contents at `/cdn/{name}`, as a CDN would.
    pub location: Option<String>,
    pub redirect_get_only: bool,
}

/// How the fake Hub behaves for its single repo.
#[derive(Clone, Default)]
pub struct FakeRepo {
    pub repo_id: String,
    pub commit: String,
    pub files: BTreeMap<String, FakeFile>,
    /// Downloads need a token (any): 401 GatedRepo without one.
    pub gated: bool,
    /// Downloads are refused even with a token: 403 GatedRepo.
    pub license_not_accepted: bool,
}

impl FakeRepo {
    pub fn new(repo_id: &str, commit: &str) -> Self {
        Self {
            repo_id: repo_id.to_string(),
            commit: commit.to_string(),
            ..Self::default()
        }
    }

    pub fn file(mut self, name: &str, contents: &[u8]) -> Self {
        let file = FakeFile {
            contents: contents.to_vec(),
            cut_after: None,
            hostile: Hostile::default(),
        };
        self.files.insert(name.to_string(), file);
        self
    }

    pub fn broken_file(mut self, name: &str, contents: &[u8], cut_after: usize) -> Self {
        let file = FakeFile {
            contents: contents.to_vec(),
            cut_after: Some(cut_after),
            hostile: Hostile::default(),
        };
        self.files.insert(name.to_string(), file);
        self
    }

    pub fn hostile_file(mut self, name: &str, contents: &[u8], hostile: Hostile) -> Self {
        let file = FakeFile {
            contents: contents.to_vec(),
            cut_after: None,
            hostile,
        };
        self.files.insert(name.to_string(), file);
        self
    }
}

/// A minimal HTTP/1.1 server on 127.0.0.1 that answers the few requests a Hub client
/// makes: the repo info API, and `resolve` downloads (`HEAD` for the metadata, then `GET`
/// for the body, with `Range` when resuming). Records each request line (method and path)
/// and whether it carried a token.
pub struct FakeHub {
    pub endpoint: String,
    requests: Arc<Mutex<Vec<(String, bool)>>>,
}

impl FakeHub {
    pub fn start(repo: FakeRepo) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind localhost");
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&requests);
        let address = endpoint.clone();
        // Lives until the test process exits; connections are handled one at a time,
        // which is all a blocking client needs.
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = serve(stream, &repo, &address, &log);
            }
        });
        Self { endpoint, requests }
    }

    /// Request lines so far, e.g. `GET /api/models/o/n/revision/main`, `HEAD /o/n/resolve/...`.
    pub fn requests(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .map(|(line, _)| line.clone())
            .collect()
    }

    pub fn any_request_had_token(&self) -> bool {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .any(|(_, token)| *token)
    }
}

fn serve(
    stream: TcpStream,
    repo: &FakeRepo,
    endpoint: &str,
    log: &Mutex<Vec<(String, bool)>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut headers = BTreeMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.trim_end().split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let has_token = headers.contains_key("authorization");
    log.lock()
        .unwrap()
        .push((format!("{method} {path}"), has_token));

    let head = method == "HEAD";
    let response = respond(
        repo,
        endpoint,
        &path,
        head,
        headers.get("range").map(String::as_str),
        has_token,
    );
    write_response(stream, response, head)
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Announced length when the body is cut short on purpose.
    content_length: Option<usize>,
}

impl Response {
    fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: body.into(),
            content_length: None,
        }
    }

    fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    fn hub_error(status: u16, code: &str, message: &str) -> Self {
        Self::new(status, format!("{{\"error\":\"{message}\"}}"))
            .header("X-Error-Code", code)
            .header("X-Error-Message", message)
    }
}

fn respond(
    repo: &FakeRepo,
    endpoint: &str,
    path: &str,
    head: bool,
    range: Option<&str>,
    has_token: bool,
) -> Response {
    let info_path = format!("/api/models/{}/revision/", repo.repo_id);
    if let Some(revision) = path.strip_prefix(&info_path) {
        if revision != "main" && revision != repo.commit {
            return Response::hub_error(404, "RevisionNotFound", "Invalid rev id");
        }
        let siblings: Vec<String> = repo
            .files
            .keys()
            .map(|name| format!("{{\"rfilename\":\"{name}\"}}"))
            .collect();
        let body = format!(
            "{{\"sha\":{:?},\"siblings\":[{}]}}",
            repo.commit,
            siblings.join(",")
        );
        return Response::new(200, body).header("Content-Type", "application/json");
    }

    if let Some(name) = path.strip_prefix("/cdn/") {
        return match repo.files.get(name) {
            Some(file) => body(file, head, range, Response::new),
            None => Response::new(404, "no such object"),
        };
    }

    let resolve_prefix = format!("/{}/resolve/", repo.repo_id);
    let Some(rest) = path.strip_prefix(&resolve_prefix) else {
        return Response::hub_error(401, "RepoNotFound", "Repository not found");
    };
    let Some((_revision, name)) = rest.split_once('/') else {
        return Response::hub_error(404, "EntryNotFound", "Entry not found");
    };
    if repo.gated && !has_token {
        return Response::hub_error(
            401,
            "GatedRepo",
            "Access to model is restricted. Please log in.",
        );
    }
    if repo.license_not_accepted {
        return Response::hub_error(403, "GatedRepo", "You are not in the authorized list.");
    }
    let Some(file) = repo.files.get(name) else {
        return Response::hub_error(404, "EntryNotFound", "Entry not found");
    };

    let hostile = &file.hostile;
    let etag = hostile
        .etag
        .clone()
        .unwrap_or_else(|| format!("\"{}\"", fake_etag(&file.contents)));
    let commit = hostile
        .commit
        .clone()
        .unwrap_or_else(|| repo.commit.clone());
    let with_metadata = |mut response: Response| {
        response = response
            .header("ETag", etag.clone())
            .header("X-Repo-Commit", commit.clone());
        if let Some(linked) = &hostile.linked_etag {
            response = response.header("X-Linked-Etag", linked.clone());
        }
        if let Some(size) = &hostile.linked_size {
            response = response.header("X-Linked-Size", size.clone());
        }
        response
    };
    if let Some(location) = &hostile.location {
        if !(head && hostile.redirect_get_only) {
            let location = location.replace("{endpoint}", endpoint);
            return with_metadata(Response::new(302, "")).header("Location", location);
        }
    }
    body(file, head, range, |status, body| {
        with_metadata(Response::new(status, body))
    })
}

/// The file's body (from the `Range` start, if any), cut short if the file says so.
fn body(
    file: &FakeFile,
    head: bool,
    range: Option<&str>,
    make: impl Fn(u16, Vec<u8>) -> Response,
) -> Response {
    let size = file.contents.len();
    let start: usize = range
        .and_then(|range| range.strip_prefix("bytes="))
        .and_then(|range| range.split('-').next())
        .and_then(|start| start.parse().ok())
        .unwrap_or(0)
        .min(size);
    let status = if range.is_some() { 206 } else { 200 };
    let mut response = make(status, file.contents[start..].to_vec());
    if range.is_some() {
        response = response.header(
            "Content-Range",
            format!("bytes {start}-{}/{size}", size.saturating_sub(1)),
        );
    }
    if let (false, Some(cut)) = (head, file.cut_after) {
        response.content_length = Some(response.body.len());
        response.body.truncate(cut);
    }
    response
}

fn write_response(mut stream: TcpStream, response: Response, head: bool) -> std::io::Result<()> {
    let length = response.content_length.unwrap_or(response.body.len());
    let mut head_text = format!(
        "HTTP/1.1 {} Fake\r\nContent-Length: {length}\r\nConnection: close\r\n",
        response.status
    );
    for (name, value) in &response.headers {
        head_text.push_str(&format!("{name}: {value}\r\n"));
    }
    head_text.push_str("\r\n");
    stream.write_all(head_text.as_bytes())?;
    if !head {
        stream.write_all(&response.body)?;
    }
    stream.flush()?;
    stream.shutdown(std::net::Shutdown::Both)
}

/// The partial downloads in a repo's blob folder: ours (`.incomplete`), and hf-hub's
/// (`.part`) from older versions.
pub fn partial_files(repo_dir: &Path) -> BTreeSet<String> {
    walk(&repo_dir.join("blobs"))
        .into_iter()
        .filter(|name| name.ends_with(".part") || name.ends_with(".incomplete"))
        .collect()
}

/// The requests so far whose line starts with `method` and that download a file.
pub fn resolve_requests(hub: &FakeHub, method: &str) -> Vec<String> {
    hub.requests()
        .into_iter()
        .filter(|line| line.starts_with(&format!("{method} ")) && line.contains("/resolve/"))
        .collect()
}
