//! Downloads from the hub through `hf-hub`, with errors that say what the
//! hub answered, and a check that a downloaded weight file is the one the
//! hub named.

use super::progress::DownloadBar;
use super::HubOptions;
use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Repo, RepoType};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Where a download is going, for messages.
struct Target<'a> {
    repo: &'a str,
    revision: &'a str,
    file: Option<&'a str>,
    options: &'a HubOptions,
}

impl Target<'_> {
    fn endpoint(&self) -> &str {
        self.options
            .endpoint
            .as_deref()
            .unwrap_or("https://huggingface.co")
    }

    /// What went wrong, in the hub's terms.
    fn explain(&self, e: ApiError) -> String {
        let (repo, revision) = (self.repo, self.revision);
        match e {
            ApiError::RequestError(e) => match *e {
                ureq::Error::Status(status, response) => {
                    let code = response.header("x-error-code").unwrap_or_default().to_string();
                    let url = response.get_url().to_string();
                    match (status, code.as_str()) {
                        (_, "GatedRepo") | (401 | 403, _) if code != "RepoNotFound" => {
                            let hint = match self.options.token {
                                Some(_) => "the token sent (HF_TOKEN or the token file) has no access: request it on the repo's page",
                                None => "set HF_TOKEN to a token with access to it",
                            };
                            format!("{repo} is gated or private: the hub answered {status} for {url}; {hint}")
                        }
                        (_, "RepoNotFound") => format!(
                            "the hub at {} has no repo {repo} ({status}){}",
                            self.endpoint(),
                            if self.options.token.is_none() { "; if it is private, set HF_TOKEN" } else { "" }
                        ),
                        (_, "RevisionNotFound") => format!("{repo} has no revision {revision} (no such branch, tag or commit)"),
                        (_, "EntryNotFound") | (404, _) => {
                            format!("{repo}@{revision} has no file {} ({status} for {url})", self.file.unwrap_or("?"))
                        }
                        _ => format!("the hub answered HTTP {status} for {url}"),
                    }
                }
                ureq::Error::Transport(t) => format!("cannot reach the hub at {}: {t}", self.endpoint()),
            },
            ApiError::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof || e.kind() == std::io::ErrorKind::ConnectionReset => {
                format!(
                    "the download of {} was interrupted ({e}); the part received is kept in the cache's blobs/ as a .part file \
                     and the next run resumes it",
                    self.file.unwrap_or("the file")
                )
            }
            ApiError::MissingHeader(header) => format!(
                "the answer of {} lacks the `{header}` header that the hub sends (is HF_ENDPOINT a Hugging Face hub?)",
                self.endpoint()
            ),
            other => other.to_string(),
        }
    }
}

/// Downloads a repo file into the cache through hf-hub, with a progress
/// bar on a terminal; `file: None` asks the hub for the repo's files and
/// takes the checkpoint among them ([`super::choose`]).
pub fn download(
    repo: &str,
    revision: &str,
    file: Option<&str>,
    options: &HubOptions,
) -> Result<PathBuf, String> {
    let mut target = Target {
        repo,
        revision,
        file,
        options,
    };
    let mut builder =
        ApiBuilder::from_cache(hf_hub::Cache::new(options.cache_dir.clone())).with_progress(false);
    if let Some(endpoint) = &options.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    builder = builder.with_token(options.token.clone());
    let api = builder
        .build()
        .map_err(|e| format!("cannot set up the hub client: {e}"))?;
    let api_repo = api.repo(Repo::with_revision(
        repo.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    let file = match file {
        Some(file) => file.to_string(),
        None => {
            let info = api_repo
                .info()
                .map_err(|e| format!("listing the repo's files failed: {}", target.explain(e)))?;
            let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
            match super::choose(&files) {
                Some(file) => file.to_string(),
                None => {
                    return Err(format!(
                        "the repo has none of {}; it has {}",
                        super::tried(None),
                        files.join(", ")
                    ))
                }
            }
        }
    };
    target.file = Some(&file);
    let started = std::time::Instant::now();
    let path = api_repo
        .download_with_progress(&file, DownloadBar::stderr())
        .map_err(|e| format!("downloading {file} failed: {}", target.explain(e)))?;
    verify(&path)?;
    let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    tracing::info!(
        repo,
        revision,
        file,
        bytes,
        seconds = started.elapsed().as_secs_f64(),
        "downloaded into the hub cache"
    );
    Ok(path)
}

/// Checks a downloaded file against its blob's name when that is a SHA-256
/// (the hub's etag of LFS files, which weights are). A mismatch removes
/// the file and its blob, so that no later run takes them for the file.
fn verify(path: &Path) -> Result<(), String> {
    let blob = std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let Some(expected) = blob
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()))
    else {
        return Ok(());
    };
    let found = sha256(&blob).map_err(|e| format!("{}: {e}", blob.display()))?;
    if found == expected.to_ascii_lowercase() {
        return Ok(());
    }
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(&blob);
    Err(format!(
        "the downloaded file's SHA-256 is {found}, not the {expected} the hub named; removed {} and its blob: run again to download it afresh",
        path.display()
    ))
}

/// The SHA-256 of a file, in lower-case hex.
fn sha256(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        context.update(&buf[..n]);
    }
    Ok(context
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
