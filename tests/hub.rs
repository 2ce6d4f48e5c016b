//! `--model` resolution: local paths, and hub repos from a Hugging Face cache
//! laid out as `huggingface_hub` and `hf-hub` write it; `idkm pull`.

use idkm::hub::{self, HubOptions, ModelSource};
use idkm::Error;
use std::path::{Path, PathBuf};
use std::process::Command;

const MAIN: &str = "0123456789abcdef0123456789abcdef01234567";
const V1: &str = "89abcdef0123456789abcdef0123456789abcdef";

fn offline(cache: &Path) -> HubOptions {
    HubOptions { cache_dir: cache.to_path_buf(), offline: true, endpoint: None, token: None }
}

/// Puts `files` of `repo` at `commit` into the cache, as symlinks into
/// `blobs/` (what the hub clients write) or as plain files, and points
/// `refs/<revision>` at the commit. Returns the snapshot folder.
fn cache_repo(cache: &Path, repo: &str, revision: &str, commit: &str, files: &[&str], symlinks: bool) -> PathBuf {
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let snapshot = repo_dir.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs").join(revision), commit).unwrap();
    for file in files {
        let contents = format!("{repo}@{commit}/{file}");
        if symlinks {
            let blob = repo_dir.join("blobs").join(format!("{:x}", contents.len() * 7919 + file.len()));
            std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
            std::fs::write(&blob, &contents).unwrap();
            std::os::unix::fs::symlink(Path::new("../../blobs").join(blob.file_name().unwrap()), snapshot.join(file))
                .unwrap();
        } else {
            std::fs::write(snapshot.join(file), &contents).unwrap();
        }
    }
    snapshot
}

fn source(s: &str) -> ModelSource {
    s.parse().unwrap()
}

#[test]
fn hub_repos_resolve_from_the_cache_offline() {
    for symlinks in [true, false] {
        let cache = tempfile::tempdir().unwrap();
        let files = ["config.json", "pytorch_model.bin", "model.safetensors"];
        let main = cache_repo(cache.path(), "owner/name", "main", MAIN, &files, symlinks);
        let v1 = cache_repo(cache.path(), "owner/name", "v1", V1, &["model.safetensors"], symlinks);
        // A ref written with a trailing newline (by hand or by other tools) works too.
        std::fs::write(cache.path().join("models--owner--name/refs/v1"), format!("{V1}\n")).unwrap();
        let o = offline(cache.path());
        let resolve = |s: ModelSource| hub::resolve_with(&s, &o).unwrap();

        let expected = main.join("model.safetensors");
        assert_eq!(resolve(source("owner/name")), expected, "symlinks: {symlinks}");
        assert_eq!(resolve(source("owner/name@main")), expected);
        assert_eq!(resolve(source(&format!("owner/name@{MAIN}"))), expected, "a commit hash is a revision");
        assert_eq!(resolve(source("owner/name@v1")), v1.join("model.safetensors"));
        let config = resolve(ModelSource::hub("owner/name", None, Some("config.json".into())).unwrap());
        assert_eq!(config, main.join("config.json"));
        assert_eq!(std::fs::read_to_string(config).unwrap(), format!("owner/name@{MAIN}/config.json"));
        let pinned = ModelSource::hub("owner/name@main", Some("v1".into()), None).unwrap();
        assert_eq!(resolve(pinned), v1.join("model.safetensors"), "--revision overrides @revision");
    }
}

#[test]
fn the_checkpoint_file_is_chosen_by_preference() {
    let cache = tempfile::tempdir().unwrap();
    let bin = cache_repo(cache.path(), "timm/bin-only", "main", MAIN, &["config.json", "pytorch_model.bin"], true);
    let pth = cache_repo(cache.path(), "owner/pth", "main", MAIN, &["z.pth", "resnet18-f37072fd.pth"], false);
    let o = offline(cache.path());
    assert_eq!(hub::resolve_with(&source("timm/bin-only"), &o).unwrap(), bin.join("pytorch_model.bin"));
    assert_eq!(hub::resolve_with(&source("owner/pth"), &o).unwrap(), pth.join("resnet18-f37072fd.pth"));
}

#[test]
fn what_is_not_cached_is_an_error_naming_repo_revision_files_and_cache() {
    let cache = tempfile::tempdir().unwrap();
    let snapshot = cache_repo(cache.path(), "owner/name", "main", MAIN, &["model.safetensors"], true);
    let o = offline(cache.path());
    let cache_dir = cache.path().display().to_string();
    let error = |s: ModelSource| match hub::resolve_with(&s, &o) {
        Err(Error::Hub(msg)) => msg,
        other => panic!("expected a hub error, got {other:?}"),
    };

    let msg = error(source("someone/absent"));
    let parts = ["someone/absent@main", &cache_dir, "models--someone--absent", "model.safetensors, pytorch_model.bin", "HF_HUB_OFFLINE"];
    for part in parts {
        assert!(msg.contains(part), "`{part}` not in: {msg}");
    }
    let msg = error(source("owner/name@dev"));
    assert!(msg.contains("owner/name@dev") && msg.contains("refs/dev"), "{msg}");
    let msg = error(ModelSource::hub("owner/name", None, Some("tf_model.h5".into())).unwrap());
    assert!(msg.contains("tf_model.h5") && msg.contains(&*snapshot.to_string_lossy()), "{msg}");

    // A symlink whose blob is gone (an interrupted download) is not a file.
    std::fs::remove_dir_all(cache.path().join("models--owner--name/blobs")).unwrap();
    let msg = error(source("owner/name"));
    assert!(msg.contains("holds none of"), "{msg}");
}

#[test]
fn model_names_parse_as_local_paths_or_repo_ids() {
    let dir = tempfile::tempdir().unwrap();
    let hub = |repo: &str, revision: &str| ModelSource::Hub { repo: repo.into(), revision: revision.into(), file: None };
    assert_eq!(source("owner/name"), hub("owner/name", "main"));
    assert_eq!(source("timm/resnet18.a1_in1k@refs/pr/1"), hub("timm/resnet18.a1_in1k", "refs/pr/1"));
    for local in ["weights/resnet18.safetensors", "runs/best.pth", "resnet18", "a/b/c"] {
        assert_eq!(source(local), ModelSource::Local(local.into()), "{local}");
    }
    // An existing path wins over a repo id.
    let existing = dir.path().join("owner").join("name");
    std::fs::create_dir_all(&existing).unwrap();
    let s = existing.to_str().unwrap();
    assert_eq!(source(s), ModelSource::Local(existing.clone()));
    assert!("".parse::<ModelSource>().is_err());
    assert!(ModelSource::hub("not a repo", None, None).is_err());
    assert!(ModelSource::hub("owner/name@../../etc", None, None).is_err());
}

#[test]
fn local_files_and_directories_resolve() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("best.pth");
    std::fs::write(&file, b"x").unwrap();
    assert_eq!(hub::resolve(&ModelSource::Local(file.clone())).unwrap(), file);
    let folder = dir.path().join("export");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(folder.join("pytorch_model.bin"), b"x").unwrap();
    std::fs::write(folder.join("config.json"), b"{}").unwrap();
    assert_eq!(hub::resolve(&ModelSource::Local(folder.clone())).unwrap(), folder.join("pytorch_model.bin"));
    std::fs::remove_file(folder.join("pytorch_model.bin")).unwrap();
    let e = hub::resolve(&ModelSource::Local(folder.clone())).unwrap_err();
    assert!(matches!(&e, Error::Io { path, .. } if *path == folder) && e.to_string().contains("holds none of"), "{e}");
    let missing = dir.path().join("missing.safetensors");
    let e = hub::resolve(&ModelSource::Local(missing.clone())).unwrap_err();
    assert!(matches!(&e, Error::Io { path, .. } if *path == missing), "{e}");
}

/// `idkm pull` with a clean hub environment plus `vars`.
fn pull(args: &[&str], vars: &[(&str, &Path)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_idkm"));
    cmd.arg("pull").args(args);
    for var in ["HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_TOKEN", "XDG_CACHE_HOME"] {
        cmd.env_remove(var);
    }
    for var in ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"] {
        cmd.env_remove(var);
    }
    cmd.envs(vars.iter().map(|(k, v)| (k, v.as_os_str())));
    cmd.output().expect("run idkm")
}

fn stdout_line(out: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "idkm pull failed: {stderr}");
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn pull_prints_the_cached_snapshot_path() {
    let home = tempfile::tempdir().unwrap();
    let cache = home.path().join("hub");
    let main = cache_repo(&cache, "owner/name", "main", MAIN, &["model.safetensors", "config.json"], true);
    let v1 = cache_repo(&cache, "owner/name", "v1", V1, &["model.safetensors"], true);
    let yes = Path::new("1");
    let env = [("HF_HOME", home.path()), ("HF_HUB_OFFLINE", yes)];

    let out = pull(&["owner/name"], &env);
    assert_eq!(stdout_line(&out), format!("{}\n", main.join("model.safetensors").display()));
    let out = pull(&["owner/name", "--revision", "v1"], &env);
    assert_eq!(stdout_line(&out), format!("{}\n", v1.join("model.safetensors").display()));
    let out = pull(&["owner/name@main", "--file", "config.json"], &env);
    assert_eq!(stdout_line(&out), format!("{}\n", main.join("config.json").display()));
    // HF_HUB_CACHE names the cache itself and wins over HF_HOME.
    let elsewhere = tempfile::tempdir().unwrap();
    let out = pull(&["owner/name"], &[("HF_HOME", elsewhere.path()), ("HF_HUB_CACHE", &cache), ("HF_HUB_OFFLINE", yes)]);
    assert_eq!(stdout_line(&out), format!("{}\n", main.join("model.safetensors").display()));

    let out = pull(&["someone/absent"], &env);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("someone/absent") && stderr.contains(&*cache.to_string_lossy()), "{stderr}");
}

#[test]
fn pull_falls_back_to_the_cache_when_the_hub_is_unreachable() {
    let home = tempfile::tempdir().unwrap();
    let main = cache_repo(&home.path().join("hub"), "owner/name", "main", MAIN, &["model.safetensors"], true);
    // Nothing listens on port 1: the hub cannot be reached, without internet.
    let env = [("HF_HOME", home.path()), ("HF_ENDPOINT", Path::new("http://127.0.0.1:1"))];
    let out = pull(&["owner/name"], &env);
    assert_eq!(stdout_line(&out), format!("{}\n", main.join("model.safetensors").display()));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cached copy"));

    let out = pull(&["someone/absent"], &env);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("listing the repo's files failed") && stderr.contains("does not exist"), "{stderr}");
}
