//! A local Hugging Face hub for the tests: a small HTTP/1.1 server on
//! 127.0.0.1 that answers what `hf-hub`'s sync client asks (selected with
//! `HF_ENDPOINT`), as the real hub does:
//!
//! - `GET /api/models/{repo}/revision/{rev}`: the repo's files at a
//!   revision (a branch, a tag or a commit hash) and the commit (`sha`).
//! - `GET /{repo}/resolve/{rev}/{file}`: the file with the `x-repo-commit`
//!   and `etag` headers; weights (`.bin`, `.pth`, `.pt`, `.safetensors`)
//!   are LFS files, answered with a redirect to `/cdn/{sha256}` carrying
//!   `x-linked-etag` (the SHA-256) and `x-linked-size`, as the hub sends
//!   them to its CDN. Ranges (`Range: bytes=a-b`, `bytes=a-`) get 206 and
//!   `Content-Range`.
//! - Errors with the hub's `x-error-code`: 404 `RepoNotFound`,
//!   `RevisionNotFound`, `EntryNotFound`; 401 `GatedRepo` for a gated repo
//!   without its token.
//!
//! Faults on demand: the next CDN download dropped after some bytes, and
//! resumed downloads answered with the whole file (a server that ignores
//! `Range: bytes=N-`). Every
//! request is logged. Each connection serves one request
//! (`Connection: close`); the server stops when dropped.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// A commit's files: (name, contents).
pub type Files = Vec<(String, Vec<u8>)>;

/// One repo: its commits (hash -> files) and its branches and tags.
#[derive(Clone, Default)]
pub struct Repo {
    /// Branch and tag names with the commit each points to.
    pub refs: Vec<(String, String)>,
    /// Commit hash -> files.
    pub commits: Vec<(String, Files)>,
    /// A gated repo answers 401 unless this token is sent.
    pub token: Option<String>,
}

/// A request as the server saw it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// The path as sent (percent-encoded), without the query.
    pub path: String,
    /// Header names in lower case.
    pub headers: HashMap<String, String>,
}

#[derive(Default)]
struct State {
    repos: HashMap<String, Repo>,
    log: Vec<Request>,
    /// Drop the next full CDN download after this many bytes.
    drop_after: Option<usize>,
    /// Answer `Range: bytes=N-` (N > 0) with the whole file.
    ignore_resumes: bool,
}

/// The server; it stops when dropped.
pub struct LocalHub {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn is_lfs(file: &str) -> bool {
    [".bin", ".pth", ".pt", ".safetensors"]
        .iter()
        .any(|ext| file.ends_with(ext))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (
            bytes[i],
            bytes
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()),
        ) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Send only this many bytes of the body, then drop the connection.
    cut: Option<usize>,
}

impl Response {
    fn new(status: u16, body: Vec<u8>) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body,
            cut: None,
        }
    }
    fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
    fn error(status: u16, code: &str, message: &str) -> Self {
        Self::new(status, format!("{{\"error\":\"{message}\"}}").into_bytes())
            .header("x-error-code", code)
            .header("x-error-message", message)
            .header("content-type", "application/json")
    }
}

impl LocalHub {
    /// Starts serving `repos` (by id `owner/name`) on a free port.
    pub fn start(repos: Vec<(&str, Repo)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            repos: repos
                .into_iter()
                .map(|(id, r)| (id.to_string(), r))
                .collect(),
            ..State::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(stream) = stream {
                        let state = state.clone();
                        std::thread::spawn(move || serve(stream, &state, addr));
                    }
                }
            })
        };
        Self {
            addr,
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// The address for `HF_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().unwrap().log.clone()
    }

    /// Forgets the requests so far.
    pub fn clear_requests(&self) {
        self.state.lock().unwrap().log.clear();
    }

    /// The next CDN download of a whole file (not a 1-byte probe) sends
    /// `bytes` bytes and then drops the connection.
    pub fn drop_next_download_after(&self, bytes: usize) {
        self.state.lock().unwrap().drop_after = Some(bytes);
    }

    /// Answer resumed downloads (`Range: bytes=N-`, N > 0) with the whole
    /// file (200), as a server that mishandles ranges would.
    pub fn ignore_resumes(&self, ignore: bool) {
        self.state.lock().unwrap().ignore_resumes = ignore;
    }
}

impl Drop for LocalHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn read_request(stream: &TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next()?.to_string(), parts.next()?.to_string());
    let mut headers = HashMap::new();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).ok()? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    let path = target.split('?').next().unwrap_or_default();
    Some(Request {
        method,
        path: path.to_string(),
        headers,
    })
}

fn serve(mut stream: TcpStream, state: &Mutex<State>, addr: SocketAddr) {
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(10)));
    let Some(request) = read_request(&stream) else {
        return;
    };
    let response = {
        let mut state = state.lock().unwrap();
        state.log.push(request.clone());
        route(&request, &mut state, addr)
    };
    let mut head = format!("HTTP/1.1 {} X\r\n", response.status);
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        response.body.len()
    ));
    let _ = stream.write_all(head.as_bytes());
    if request.method != "HEAD" {
        let sent = response
            .cut
            .unwrap_or(response.body.len())
            .min(response.body.len());
        let _ = stream.write_all(&response.body[..sent]);
    }
    let _ = stream.flush();
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// `bytes=a-b` or `bytes=a-` of a body of `len` bytes, inclusive.
fn range(header: &str, len: usize) -> Option<(usize, usize)> {
    let (start, end) = header.strip_prefix("bytes=")?.split_once('-')?;
    let start: usize = start.parse().ok()?;
    let end = if end.is_empty() {
        len.checked_sub(1)?
    } else {
        end.parse::<usize>().ok()?.min(len.checked_sub(1)?)
    };
    (start <= end).then_some((start, end))
}

/// A body, whole or the requested range of it.
fn ranged(request: &Request, body: &[u8], ignore_resumes: bool) -> Response {
    match request.headers.get("range") {
        Some(header) if ignore_resumes && !header.starts_with("bytes=0-") => {
            Response::new(200, body.to_vec())
        }
        Some(header) => match range(header, body.len()) {
            Some((start, end)) => Response::new(206, body[start..=end].to_vec()).header(
                "Content-Range",
                format!("bytes {start}-{end}/{}", body.len()),
            ),
            None => Response::new(416, Vec::new())
                .header("Content-Range", format!("bytes */{}", body.len())),
        },
        _ => Response::new(200, body.to_vec()),
    }
}

fn route(request: &Request, state: &mut State, addr: SocketAddr) -> Response {
    let path = percent_decode(&request.path);
    if let Some(sha) = path.strip_prefix("/cdn/") {
        let blob = state
            .repos
            .values()
            .flat_map(|r| &r.commits)
            .flat_map(|(_, files)| files)
            .find(|(_, b)| sha256_hex(b) == sha);
        let Some((_, body)) = blob else {
            return Response::new(404, b"no such blob".to_vec());
        };
        let mut response = ranged(request, body, state.ignore_resumes);
        if response.body.len() > 1 {
            response.cut = state.drop_after.take();
        }
        return response.header("ETag", format!("\"{sha}\""));
    }
    let (api, rest) = match path.strip_prefix("/api/models/") {
        Some(rest) => (true, rest),
        None => (false, path.trim_start_matches('/')),
    };
    let mut parts = rest.splitn(3, '/');
    let (Some(owner), Some(name), Some(tail)) = (parts.next(), parts.next(), parts.next()) else {
        return Response::error(404, "RepoNotFound", "Repository not found");
    };
    let id = format!("{owner}/{name}");
    let Some(repo) = state.repos.get(&id) else {
        return Response::error(404, "RepoNotFound", "Repository not found");
    };
    if let Some(token) = &repo.token {
        if request.headers.get("authorization") != Some(&format!("Bearer {token}")) {
            return Response::error(
                401,
                "GatedRepo",
                &format!("Access to model {id} is restricted. You must be authenticated."),
            );
        }
    }
    let (revision, file) = match (
        api,
        tail.strip_prefix("revision/"),
        tail.strip_prefix("resolve/"),
    ) {
        (true, Some(revision), _) => (revision.to_string(), None),
        (false, _, Some(rest)) => {
            // The revision may hold slashes (refs/pr/1): the longest known one that prefixes the rest.
            let known = repo
                .refs
                .iter()
                .map(|(r, _)| r.as_str())
                .chain(repo.commits.iter().map(|(c, _)| c.as_str()));
            let Some(revision) = known
                .filter(|r| rest.starts_with(&format!("{r}/")))
                .max_by_key(|r| r.len())
            else {
                return Response::error(404, "RevisionNotFound", "Invalid rev id");
            };
            (
                revision.to_string(),
                Some(rest[revision.len() + 1..].to_string()),
            )
        }
        _ => return Response::error(404, "RepoNotFound", "Repository not found"),
    };
    let commit = repo
        .refs
        .iter()
        .find(|(r, _)| *r == revision)
        .map(|(_, c)| c.clone())
        .unwrap_or(revision.clone());
    let Some((_, files)) = repo.commits.iter().find(|(c, _)| *c == commit) else {
        return Response::error(404, "RevisionNotFound", "Invalid rev id");
    };
    let Some(file) = file else {
        let siblings: Vec<String> = files
            .iter()
            .map(|(f, _)| format!("{{\"rfilename\":\"{f}\"}}"))
            .collect();
        let body = format!(
            "{{\"id\":\"{id}\",\"sha\":\"{commit}\",\"siblings\":[{}]}}",
            siblings.join(",")
        );
        return Response::new(200, body.into_bytes()).header("content-type", "application/json");
    };
    let Some((_, body)) = files.iter().find(|(f, _)| *f == file) else {
        return Response::error(
            404,
            "EntryNotFound",
            &format!("{file} does not exist on \"{revision}\""),
        );
    };
    let git_etag = format!(
        "\"{}\"",
        &sha256_hex(format!("blob {file} {commit}").as_bytes())[..40]
    );
    if is_lfs(&file) {
        let sha = sha256_hex(body);
        return Response::new(302, Vec::new())
            .header("Location", format!("http://{addr}/cdn/{sha}"))
            .header("x-repo-commit", commit)
            .header("x-linked-etag", format!("\"{sha}\""))
            .header("x-linked-size", body.len().to_string())
            .header("ETag", git_etag);
    }
    ranged(request, body, state.ignore_resumes)
        .header("x-repo-commit", commit)
        .header("ETag", git_etag)
}
