//! Resolving `--model` through the Hugging Face hub cache.
//!
//! A [`ModelSource`] names a local checkpoint or a hub repo; [`resolve`]
//! turns it into a local file. Hub files live in the standard cache that
//! `huggingface_hub` (Python) and `hf-hub` (Rust) share:
//! `<cache>/models--owner--name/refs/<revision>` holds a commit hash and
//! `<cache>/models--owner--name/snapshots/<hash>/<file>` the file (usually a
//! symlink into `blobs/`).

mod download;
pub mod progress;

use crate::{Error, Result};
use hf_hub::Repo;
use std::path::{Path, PathBuf};

/// The checkpoint files looked for, in this order, when no file is named;
/// after them the first `*.pth` by name.
pub const CHECKPOINT_FILES: [&str; 3] = ["model.safetensors", "pytorch_model.bin", "model.bin"];

/// What `--model` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A checkpoint file, or a directory holding one (see [`CHECKPOINT_FILES`]).
    Local(PathBuf),
    /// A model repo on the Hugging Face hub.
    Hub {
        /// `owner/name`.
        repo: String,
        /// Branch, tag or commit hash.
        revision: String,
        /// The file to use; `None` picks the first of [`CHECKPOINT_FILES`]
        /// (then `*.pth`) that the repo has.
        file: Option<String>,
    },
}

impl ModelSource {
    /// A hub source from a repo id, `owner/name` or `owner/name@revision`;
    /// an explicit `revision` overrides the one in the id, and the default
    /// is `main`.
    pub fn hub(repo_id: &str, revision: Option<String>, file: Option<String>) -> Result<Self> {
        let (repo, in_id) = match repo_id.split_once('@') {
            Some((repo, revision)) => (repo, Some(revision.to_string())),
            None => (repo_id, None),
        };
        if !is_repo_id(repo) {
            return Err(Error::Hub(format!(
                "`{repo}` is not a hub repo id (owner/name, of letters, digits, `-`, `_` and `.`)"
            )));
        }
        let revision = revision.or(in_id).unwrap_or_else(|| "main".to_string());
        if revision.is_empty()
            || revision.starts_with('/')
            || revision.split('/').any(|part| part == "..")
        {
            return Err(Error::Hub(format!(
                "`{revision}` is not a valid revision of {repo}"
            )));
        }
        Ok(Self::Hub {
            repo: repo.to_string(),
            revision,
            file,
        })
    }
}

impl std::str::FromStr for ModelSource {
    type Err = Error;

    /// An existing path is [`ModelSource::Local`]. Otherwise a repo id
    /// (`owner/name` or `owner/name@revision`) that does not end like a
    /// checkpoint file (`.safetensors`, `.bin`, `.pth`, `.pt`) is
    /// [`ModelSource::Hub`], and anything else is a local path that
    /// [`resolve`] will report missing.
    fn from_str(s: &str) -> Result<Self> {
        if s.is_empty() {
            return Err(Error::Hub("empty model name".to_string()));
        }
        let looks_like_file = [".safetensors", ".bin", ".pth", ".pt"]
            .iter()
            .any(|ext| s.ends_with(ext));
        if Path::new(s).exists() || looks_like_file || !s.contains('/') {
            return Ok(Self::Local(PathBuf::from(s)));
        }
        let repo = s.split_once('@').map_or(s, |(repo, _)| repo);
        if is_repo_id(repo) {
            Self::hub(s, None, None)
        } else {
            Ok(Self::Local(PathBuf::from(s)))
        }
    }
}

/// `owner/name`, each part non-empty, of ASCII letters, digits, `-`, `_`,
/// `.`, not starting with `-` or `.`, without `--` or `..` (the hub's rules).
fn is_repo_id(s: &str) -> bool {
    let part_ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with(['-', '.'])
            && !p.contains("--")
            && !p.contains("..")
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    matches!(s.split_once('/'), Some((owner, name)) if part_ok(owner) && part_ok(name))
}

/// Where and how hub files are looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// The hub cache, the folder holding `models--owner--name` folders.
    pub cache_dir: PathBuf,
    /// Use the cache only and never the network.
    pub offline: bool,
    /// The hub's address; `None` for <https://huggingface.co>.
    pub endpoint: Option<String>,
    /// Access token, for private or gated repos.
    pub token: Option<String>,
}

impl HubOptions {
    /// The options `huggingface_hub` takes from the environment: the cache
    /// is `HF_HUB_CACHE`, else `$HF_HOME/hub`, else
    /// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`;
    /// offline when `HF_HUB_OFFLINE` is `1`, `true`, `yes` or `on`; the
    /// endpoint is `HF_ENDPOINT`; the token is `HF_TOKEN`, else the contents
    /// of `$HF_HOME/token` (default `~/.cache/huggingface/token`).
    pub fn from_env() -> Result<Self> {
        let var = |key: &str| std::env::var(key).ok().filter(|v| !v.is_empty());
        Self::from_vars(var, std::env::home_dir())
    }

    /// [`HubOptions::from_env`] with the variables read through `var` and
    /// the home directory given.
    fn from_vars(var: impl Fn(&str) -> Option<String>, home: Option<PathBuf>) -> Result<Self> {
        let hf_home = var("HF_HOME").map(PathBuf::from).or_else(|| {
            let cache = var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| home.map(|h| h.join(".cache")))?;
            Some(cache.join("huggingface"))
        });
        let cache_dir = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .or_else(|| hf_home.as_ref().map(|h| h.join("hub")));
        let Some(cache_dir) = cache_dir else {
            return Err(Error::Hub(
                "no home directory to put the hub cache in; set HF_HOME or HF_HUB_CACHE"
                    .to_string(),
            ));
        };
        let offline = var("HF_HUB_OFFLINE")
            .is_some_and(|v| ["1", "true", "yes", "on"].contains(&v.to_ascii_lowercase().as_str()));
        let token = var("HF_TOKEN").or_else(|| {
            let file = std::fs::read_to_string(hf_home?.join("token")).ok()?;
            Some(file.trim().to_string()).filter(|t| !t.is_empty())
        });
        Ok(Self {
            cache_dir,
            offline,
            endpoint: var("HF_ENDPOINT"),
            token,
        })
    }
}

/// Resolves a model source to a local checkpoint file, with the hub options
/// of the environment ([`HubOptions::from_env`]); see [`resolve_with`].
pub fn resolve(source: &ModelSource) -> Result<PathBuf> {
    match source {
        ModelSource::Local(path) => local(path),
        ModelSource::Hub { .. } => resolve_with(source, &HubOptions::from_env()?),
    }
}

/// Resolves a model source to a local checkpoint file.
///
/// A local file is returned as it is, a local directory gives the checkpoint
/// file it holds. A hub file is taken from the cache when the revision's
/// snapshot there has it (no request is made: a branch's later commits are
/// not looked for); otherwise, unless offline, the hub is asked for the
/// repo's files (when none is named) and the file is downloaded into the
/// cache, with a progress bar on a terminal. A downloaded weight file is
/// checked against the SHA-256 the hub named.
pub fn resolve_with(source: &ModelSource, options: &HubOptions) -> Result<PathBuf> {
    match source {
        ModelSource::Local(path) => local(path),
        ModelSource::Hub {
            repo,
            revision,
            file,
        } => hub_file(repo, revision, file.as_deref(), options),
    }
}

/// A local file as it is, or the checkpoint file of a local directory.
fn local(path: &Path) -> Result<PathBuf> {
    let not_found = |msg: String| Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, msg),
    };
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            not_found("no such file or directory (a hub model is named owner/name)".to_string())
        }
        _ => Error::Io {
            path: path.to_path_buf(),
            source: e,
        },
    })?;
    if !meta.is_dir() {
        return Ok(path.to_path_buf());
    }
    let files = list_files(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    match choose(&files) {
        Some(file) => Ok(path.join(file)),
        None => Err(not_found(format!(
            "the directory holds none of {}",
            tried(None)
        ))),
    }
}

/// The names of the files (symlinks followed) directly inside `dir`.
fn list_files(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.path().is_file() {
            files.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    Ok(files)
}

/// The checkpoint among a repo's (or a folder's) files: the first of
/// [`CHECKPOINT_FILES`] present, else the first top-level `*.pth` by name.
fn choose(files: &[String]) -> Option<&str> {
    CHECKPOINT_FILES
        .into_iter()
        .find(|c| files.iter().any(|f| f == c))
        .or_else(|| {
            files
                .iter()
                .filter(|f| f.ends_with(".pth") && !f.contains('/'))
                .min()
                .map(String::as_str)
        })
}

/// The files looked for, for messages.
fn tried(file: Option<&str>) -> String {
    match file {
        Some(file) => file.to_string(),
        None => format!("{}, *.pth", CHECKPOINT_FILES.join(", ")),
    }
}

/// A hub file from the cache (without asking the hub) or, when it is not
/// there and the hub may be asked, downloaded into it.
fn hub_file(
    repo: &str,
    revision: &str,
    file: Option<&str>,
    options: &HubOptions,
) -> Result<PathBuf> {
    let context = || {
        format!(
            "looked for {} in cache {}",
            tried(file),
            options.cache_dir.display()
        )
    };
    let missing = match cached(&options.cache_dir, repo, revision, file) {
        Ok(path) => return Ok(path),
        Err(missing) => missing,
    };
    if options.offline {
        return Err(Error::Hub(format!(
            "{repo}@{revision} is not in the cache and offline mode (HF_HUB_OFFLINE) forbids downloading: {missing}; {}",
            context()
        )));
    }
    download::download(repo, revision, file, options).map_err(|failed| {
        Error::Hub(format!(
            "{repo}@{revision}: {failed}; and the cache has no copy: {missing}; {}",
            context()
        ))
    })
}

/// A repo file from the cache, or why it is not there.
fn cached(
    cache: &Path,
    repo: &str,
    revision: &str,
    file: Option<&str>,
) -> std::result::Result<PathBuf, String> {
    let repo_dir = cache.join(Repo::model(repo.to_string()).folder_name());
    if !repo_dir.is_dir() {
        return Err(format!("{} does not exist", repo_dir.display()));
    }
    let snapshot = snapshot_dir(&repo_dir, revision)?;
    match file {
        Some(file) if snapshot.join(file).is_file() => Ok(snapshot.join(file)),
        Some(file) => Err(format!("{} has no {file}", snapshot.display())),
        None => {
            let files = list_files(&snapshot)
                .map_err(|e| format!("cannot list {}: {e}", snapshot.display()))?;
            match choose(&files) {
                Some(file) => Ok(snapshot.join(file)),
                None => Err(format!(
                    "{} holds none of {}",
                    snapshot.display(),
                    tried(None)
                )),
            }
        }
    }
}

/// The snapshot folder of a revision: the commit hash in `refs/<revision>`,
/// or the revision itself when it is a commit hash with a snapshot.
fn snapshot_dir(repo_dir: &Path, revision: &str) -> std::result::Result<PathBuf, String> {
    let ref_path = repo_dir.join("refs").join(revision);
    let is_commit = revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit());
    let commit = match std::fs::read_to_string(&ref_path) {
        Ok(hash) => hash.trim().to_string(),
        Err(_) if is_commit => revision.to_string(),
        Err(e) => return Err(format!("cannot read {}: {e}", ref_path.display())),
    };
    let snapshot = repo_dir.join("snapshots").join(&commit);
    if snapshot.is_dir() {
        Ok(snapshot)
    } else {
        Err(format!(
            "{} (commit of revision {revision}) does not exist",
            snapshot.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn options(vars: &[(&str, &str)], home: Option<&str>) -> Result<HubOptions> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        HubOptions::from_vars(|k| vars.get(k).cloned(), home.map(PathBuf::from))
    }

    #[test]
    fn cache_dir_follows_the_python_precedence() {
        let home = Some("/home/u");
        assert_eq!(
            options(&[], home).unwrap().cache_dir,
            Path::new("/home/u/.cache/huggingface/hub")
        );
        assert_eq!(
            options(&[("XDG_CACHE_HOME", "/xdg")], home)
                .unwrap()
                .cache_dir,
            Path::new("/xdg/huggingface/hub")
        );
        assert_eq!(
            options(&[("HF_HOME", "/hf")], home).unwrap().cache_dir,
            Path::new("/hf/hub")
        );
        let both = [("HF_HOME", "/hf"), ("HF_HUB_CACHE", "/cache")];
        assert_eq!(options(&both, home).unwrap().cache_dir, Path::new("/cache"));
        assert!(matches!(options(&[], None), Err(Error::Hub(_))));
        assert_eq!(
            options(&[("HF_HUB_CACHE", "/cache")], None)
                .unwrap()
                .cache_dir,
            Path::new("/cache")
        );
    }

    #[test]
    fn offline_endpoint_and_token_come_from_the_environment() {
        let o = options(&[], Some("/nonexistent-home")).unwrap();
        assert!(!o.offline && o.endpoint.is_none() && o.token.is_none());
        for value in ["1", "TRUE", "yes", "On"] {
            assert!(
                options(&[("HF_HUB_OFFLINE", value)], Some("/h"))
                    .unwrap()
                    .offline,
                "{value}"
            );
        }
        assert!(
            !options(&[("HF_HUB_OFFLINE", "0")], Some("/h"))
                .unwrap()
                .offline
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "hf_file\n").unwrap();
        let home = dir.path().to_str().unwrap();
        assert_eq!(
            options(&[("HF_HOME", home)], None)
                .unwrap()
                .token
                .as_deref(),
            Some("hf_file")
        );
        let o = options(
            &[
                ("HF_HOME", home),
                ("HF_TOKEN", "hf_env"),
                ("HF_ENDPOINT", "http://mirror"),
            ],
            None,
        )
        .unwrap();
        assert_eq!(
            (o.token.as_deref(), o.endpoint.as_deref()),
            (Some("hf_env"), Some("http://mirror"))
        );
    }

    #[test]
    fn choose_prefers_safetensors_then_bin_then_pth() {
        let files = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            choose(&files(&["pytorch_model.bin", "model.safetensors"])),
            Some("model.safetensors")
        );
        assert_eq!(
            choose(&files(&["model.bin", "pytorch_model.bin"])),
            Some("pytorch_model.bin")
        );
        assert_eq!(
            choose(&files(&["b.pth", "a.pth", "sub/0.pth"])),
            Some("a.pth")
        );
        assert_eq!(
            choose(&files(&["onnx/model.safetensors", "README.md"])),
            None
        );
    }

    #[test]
    fn repo_ids_follow_the_hub_rules() {
        for ok in ["timm/resnet18.a1_in1k", "owner/name", "a-b/c_d.e"] {
            assert!(is_repo_id(ok), "{ok}");
        }
        for bad in [
            "owner",
            "/name",
            "owner/",
            "a/b/c",
            "own er/name",
            "owner/.hidden",
            "owner/a--b",
            "../x",
        ] {
            assert!(!is_repo_id(bad), "{bad}");
        }
    }
}
