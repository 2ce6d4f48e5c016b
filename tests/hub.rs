//! `--model` resolution: local paths, and hub repos from a Hugging Face cache
//! laid out as `huggingface_hub` and `hf-hub` write it; `idkm pull` against
//! a local hub (tests/common/local_hub.rs) that speaks the hub's protocol.

mod common;

use common::local_hub::{sha256_hex, LocalHub, Repo};
use idkm::hub::{self, HubOptions, ModelSource};
use idkm::Error;
use std::path::{Path, PathBuf};
use std::process::Command;

const MAIN: &str = "0123456789abcdef0123456789abcdef01234567";
const V1: &str = "89abcdef0123456789abcdef0123456789abcdef";

fn offline(cache: &Path) -> HubOptions {
    HubOptions {
        cache_dir: cache.to_path_buf(),
        offline: true,
        endpoint: None,
        token: None,
    }
}

/// Puts `files` of `repo` at `commit` into the cache, as symlinks into
/// `blobs/` (what the hub clients write) or as plain files, and points
/// `refs/<revision>` at the commit. Returns the snapshot folder.
fn cache_repo(
    cache: &Path,
    repo: &str,
    revision: &str,
    commit: &str,
    files: &[&str],
    symlinks: bool,
) -> PathBuf {
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let snapshot = repo_dir.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs").join(revision), commit).unwrap();
    for file in files {
        let contents = format!("{repo}@{commit}/{file}");
        if symlinks {
            let blob = repo_dir
                .join("blobs")
                .join(format!("{:x}", contents.len() * 7919 + file.len()));
            std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
            std::fs::write(&blob, &contents).unwrap();
            std::os::unix::fs::symlink(
                Path::new("../../blobs").join(blob.file_name().unwrap()),
                snapshot.join(file),
            )
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
        let v1 = cache_repo(
            cache.path(),
            "owner/name",
            "v1",
            V1,
            &["model.safetensors"],
            symlinks,
        );
        // A ref written with a trailing newline (by hand or by other tools) works too.
        std::fs::write(
            cache.path().join("models--owner--name/refs/v1"),
            format!("{V1}\n"),
        )
        .unwrap();
        let o = offline(cache.path());
        let resolve = |s: ModelSource| hub::resolve_with(&s, &o).unwrap();

        let expected = main.join("model.safetensors");
        assert_eq!(
            resolve(source("owner/name")),
            expected,
            "symlinks: {symlinks}"
        );
        assert_eq!(resolve(source("owner/name@main")), expected);
        assert_eq!(
            resolve(source(&format!("owner/name@{MAIN}"))),
            expected,
            "a commit hash is a revision"
        );
        assert_eq!(
            resolve(source("owner/name@v1")),
            v1.join("model.safetensors")
        );
        let config =
            resolve(ModelSource::hub("owner/name", None, Some("config.json".into())).unwrap());
        assert_eq!(config, main.join("config.json"));
        assert_eq!(
            std::fs::read_to_string(config).unwrap(),
            format!("owner/name@{MAIN}/config.json")
        );
        let pinned = ModelSource::hub("owner/name@main", Some("v1".into()), None).unwrap();
        assert_eq!(
            resolve(pinned),
            v1.join("model.safetensors"),
            "--revision overrides @revision"
        );
    }
}

#[test]
fn the_checkpoint_file_is_chosen_by_preference() {
    let cache = tempfile::tempdir().unwrap();
    let bin = cache_repo(
        cache.path(),
        "timm/bin-only",
        "main",
        MAIN,
        &["config.json", "pytorch_model.bin"],
        true,
    );
    let pth = cache_repo(
        cache.path(),
        "owner/pth",
        "main",
        MAIN,
        &["z.pth", "resnet18-f37072fd.pth"],
        false,
    );
    let o = offline(cache.path());
    assert_eq!(
        hub::resolve_with(&source("timm/bin-only"), &o).unwrap(),
        bin.join("pytorch_model.bin")
    );
    assert_eq!(
        hub::resolve_with(&source("owner/pth"), &o).unwrap(),
        pth.join("resnet18-f37072fd.pth")
    );
}

#[test]
fn what_is_not_cached_is_an_error_naming_repo_revision_files_and_cache() {
    let cache = tempfile::tempdir().unwrap();
    let snapshot = cache_repo(
        cache.path(),
        "owner/name",
        "main",
        MAIN,
        &["model.safetensors"],
        true,
    );
    let o = offline(cache.path());
    let cache_dir = cache.path().display().to_string();
    let error = |s: ModelSource| match hub::resolve_with(&s, &o) {
        Err(Error::Hub(msg)) => msg,
        other => panic!("expected a hub error, got {other:?}"),
    };

    let msg = error(source("someone/absent"));
    let parts = [
        "someone/absent@main",
        &cache_dir,
        "models--someone--absent",
        "model.safetensors, pytorch_model.bin",
        "HF_HUB_OFFLINE",
    ];
    for part in parts {
        assert!(msg.contains(part), "`{part}` not in: {msg}");
    }
    let msg = error(source("owner/name@dev"));
    assert!(
        msg.contains("owner/name@dev") && msg.contains("refs/dev"),
        "{msg}"
    );
    let msg = error(ModelSource::hub("owner/name", None, Some("tf_model.h5".into())).unwrap());
    assert!(
        msg.contains("tf_model.h5") && msg.contains(&*snapshot.to_string_lossy()),
        "{msg}"
    );

    // A symlink whose blob is gone (an interrupted download) is not a file.
    std::fs::remove_dir_all(cache.path().join("models--owner--name/blobs")).unwrap();
    let msg = error(source("owner/name"));
    assert!(msg.contains("holds none of"), "{msg}");
}

#[test]
fn model_names_parse_as_local_paths_or_repo_ids() {
    let dir = tempfile::tempdir().unwrap();
    let hub = |repo: &str, revision: &str| ModelSource::Hub {
        repo: repo.into(),
        revision: revision.into(),
        file: None,
    };
    assert_eq!(source("owner/name"), hub("owner/name", "main"));
    assert_eq!(
        source("timm/resnet18.a1_in1k@refs/pr/1"),
        hub("timm/resnet18.a1_in1k", "refs/pr/1")
    );
    for local in [
        "weights/resnet18.safetensors",
        "runs/best.pth",
        "resnet18",
        "a/b/c",
    ] {
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
    assert_eq!(
        hub::resolve(&ModelSource::Local(file.clone())).unwrap(),
        file
    );
    let folder = dir.path().join("export");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(folder.join("pytorch_model.bin"), b"x").unwrap();
    std::fs::write(folder.join("config.json"), b"{}").unwrap();
    assert_eq!(
        hub::resolve(&ModelSource::Local(folder.clone())).unwrap(),
        folder.join("pytorch_model.bin")
    );
    std::fs::remove_file(folder.join("pytorch_model.bin")).unwrap();
    let e = hub::resolve(&ModelSource::Local(folder.clone())).unwrap_err();
    assert!(
        matches!(&e, Error::Io { path, .. } if *path == folder)
            && e.to_string().contains("holds none of"),
        "{e}"
    );
    let missing = dir.path().join("missing.safetensors");
    let e = hub::resolve(&ModelSource::Local(missing.clone())).unwrap_err();
    assert!(
        matches!(&e, Error::Io { path, .. } if *path == missing),
        "{e}"
    );
}

/// `idkm pull` with a clean hub environment plus `vars`.
fn pull(args: &[&str], vars: &[(&str, &Path)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_idkm"));
    cmd.arg("pull").args(args);
    for var in [
        "HF_HOME",
        "HF_HUB_CACHE",
        "HF_HUB_OFFLINE",
        "HF_ENDPOINT",
        "HF_TOKEN",
        "XDG_CACHE_HOME",
    ] {
        cmd.env_remove(var);
    }
    for var in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
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
    let main = cache_repo(
        &cache,
        "owner/name",
        "main",
        MAIN,
        &["model.safetensors", "config.json"],
        true,
    );
    let v1 = cache_repo(&cache, "owner/name", "v1", V1, &["model.safetensors"], true);
    let yes = Path::new("1");
    let env = [("HF_HOME", home.path()), ("HF_HUB_OFFLINE", yes)];

    let out = pull(&["owner/name"], &env);
    assert_eq!(
        stdout_line(&out),
        format!("{}\n", main.join("model.safetensors").display())
    );
    let out = pull(&["owner/name", "--revision", "v1"], &env);
    assert_eq!(
        stdout_line(&out),
        format!("{}\n", v1.join("model.safetensors").display())
    );
    let out = pull(&["owner/name@main", "--file", "config.json"], &env);
    assert_eq!(
        stdout_line(&out),
        format!("{}\n", main.join("config.json").display())
    );
    // HF_HUB_CACHE names the cache itself and wins over HF_HOME.
    let elsewhere = tempfile::tempdir().unwrap();
    let out = pull(
        &["owner/name"],
        &[
            ("HF_HOME", elsewhere.path()),
            ("HF_HUB_CACHE", &cache),
            ("HF_HUB_OFFLINE", yes),
        ],
    );
    assert_eq!(
        stdout_line(&out),
        format!("{}\n", main.join("model.safetensors").display())
    );

    let out = pull(&["someone/absent"], &env);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("someone/absent") && stderr.contains(&*cache.to_string_lossy()),
        "{stderr}"
    );
}

#[test]
fn a_cached_revision_needs_no_hub() {
    let home = tempfile::tempdir().unwrap();
    let main = cache_repo(
        &home.path().join("hub"),
        "owner/name",
        "main",
        MAIN,
        &["model.safetensors"],
        true,
    );
    // Nothing listens on port 1: the hub cannot be reached, without internet.
    let env = [
        ("HF_HOME", home.path()),
        ("HF_ENDPOINT", Path::new("http://127.0.0.1:1")),
    ];
    let out = pull(&["owner/name"], &env);
    assert_eq!(
        stdout_line(&out),
        format!("{}\n", main.join("model.safetensors").display())
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "",
        "no attempt to reach the hub"
    );

    let out = pull(&["someone/absent"], &env);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "listing the repo's files failed: cannot reach the hub at http://127.0.0.1:1"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("does not exist"), "{stderr}");
}

const A: &str = "a000000000000000000000000000000000000001";
const B: &str = "b000000000000000000000000000000000000002";
const C: &str = "c000000000000000000000000000000000000003";

/// Bytes standing for a weight file (the hub does not look into them).
fn weights(len: usize, seed: u64) -> Vec<u8> {
    common::pattern::uniform(&format!("weights{seed}"), len)
        .iter()
        .map(|u| (u * 256.0) as u8)
        .collect()
}

/// `owner/name`: `main` at A (pytorch_model.bin, config.json); `dev`, the
/// tag `v1.0` and `refs/pr/1` at B (model.safetensors); C only by its
/// hash. `owner/gated` needs the token `hf_secret`.
fn local_hub() -> (LocalHub, Vec<u8>, Vec<u8>) {
    let (bin, st) = (weights(300_000, 1), weights(50_000, 2));
    let file = |name: &str, bytes: &[u8]| (name.to_string(), bytes.to_vec());
    let repo = Repo {
        refs: [("main", A), ("dev", B), ("v1.0", B), ("refs/pr/1", B)]
            .map(|(r, c)| (r.to_string(), c.to_string()))
            .to_vec(),
        commits: vec![
            (
                A.into(),
                vec![
                    file("pytorch_model.bin", &bin),
                    file("config.json", b"{\"num_classes\": 10}"),
                ],
            ),
            (
                B.into(),
                vec![
                    file("model.safetensors", &st),
                    file("README.md", b"# owner/name"),
                ],
            ),
            (C.into(), vec![file("resnet18.pth", &st)]),
        ],
        token: None,
    };
    let gated = Repo {
        refs: vec![("main".into(), A.into())],
        commits: vec![(A.into(), vec![file("model.safetensors", &st)])],
        token: Some("hf_secret".into()),
    };
    (
        LocalHub::start(vec![("owner/name", repo), ("owner/gated", gated)]),
        bin,
        st,
    )
}

fn snapshot(home: &Path, repo: &str, commit: &str, file: &str) -> PathBuf {
    home.join("hub")
        .join(format!("models--{}", repo.replace('/', "--")))
        .join("snapshots")
        .join(commit)
        .join(file)
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn pull_downloads_into_the_standard_cache_once() {
    let (server, bin, _) = local_hub();
    let home = tempfile::tempdir().unwrap();
    let endpoint = PathBuf::from(server.endpoint());
    let env = [
        ("HF_HOME", home.path()),
        ("HF_ENDPOINT", endpoint.as_path()),
    ];

    let out = pull(&["owner/name"], &env);
    let path = snapshot(home.path(), "owner/name", A, "pytorch_model.bin");
    assert_eq!(stdout_line(&out), format!("{}\n", path.display()));
    assert_eq!(std::fs::read(&path).unwrap(), bin);
    // The standard layout: a relative symlink into blobs/, named by the
    // SHA-256 that the hub gave as the LFS etag, and refs/main.
    let sha = sha256_hex(&bin);
    assert_eq!(
        std::fs::read_link(&path).unwrap(),
        Path::new("../../blobs").join(&sha)
    );
    let repo_dir = home.path().join("hub/models--owner--name");
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        A
    );
    let requests: Vec<String> = server
        .requests()
        .iter()
        .map(|r| {
            format!(
                "{} {}",
                r.path,
                r.headers.get("range").map_or("", String::as_str)
            )
        })
        .collect();
    assert_eq!(
        requests,
        [
            "/api/models/owner/name/revision/main ".to_string(),
            "/owner/name/resolve/main/pytorch_model.bin bytes=0-0".into(),
            format!("/cdn/{sha} bytes=0-0"),
            "/owner/name/resolve/main/pytorch_model.bin bytes=0-".into(),
            format!("/cdn/{sha} bytes=0-"),
        ]
    );
    assert!(
        server
            .requests()
            .iter()
            .all(|r| !r.headers.contains_key("authorization")),
        "no token, none sent"
    );
    assert!(
        !stderr(&out).contains("ETA") && !stderr(&out).contains('\r'),
        "no progress bar off a terminal: {}",
        stderr(&out)
    );

    // Again, and offline: from the cache, without a request.
    server.clear_requests();
    assert_eq!(
        stdout_line(&pull(&["owner/name"], &env)),
        format!("{}\n", path.display())
    );
    let offline = [("HF_HOME", home.path()), ("HF_HUB_OFFLINE", Path::new("1"))];
    assert_eq!(
        stdout_line(&pull(&["owner/name@main"], &offline)),
        format!("{}\n", path.display())
    );
    assert_eq!(server.requests().len(), 0);

    // A small file is served by the hub itself (no LFS redirect).
    let out = pull(&["owner/name", "--file", "config.json"], &env);
    assert_eq!(
        stdout_line(&out),
        format!(
            "{}\n",
            snapshot(home.path(), "owner/name", A, "config.json").display()
        )
    );
    // Offline without the file: a clear refusal.
    let out = pull(&["owner/name@dev"], &offline);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains(
        "owner/name@dev is not in the cache and offline mode (HF_HUB_OFFLINE) forbids downloading"
    ));
}

#[test]
fn branches_tags_and_commits_resolve_to_their_snapshots() {
    let (server, _, st) = local_hub();
    let home = tempfile::tempdir().unwrap();
    let endpoint = PathBuf::from(server.endpoint());
    let env = [
        ("HF_HOME", home.path()),
        ("HF_ENDPOINT", endpoint.as_path()),
    ];
    let at_b = snapshot(home.path(), "owner/name", B, "model.safetensors");
    for args in [
        &["owner/name@dev"][..],
        &["owner/name", "--revision", "v1.0"],
        &["owner/name@refs/pr/1"],
    ] {
        assert_eq!(
            stdout_line(&pull(args, &env)),
            format!("{}\n", at_b.display()),
            "{args:?}"
        );
    }
    assert_eq!(std::fs::read(&at_b).unwrap(), st);
    let refs = home.path().join("hub/models--owner--name/refs");
    for name in ["dev", "v1.0", "refs/pr/1"] {
        assert_eq!(
            std::fs::read_to_string(refs.join(name)).unwrap(),
            B,
            "{name}"
        );
    }
    let at_c = snapshot(home.path(), "owner/name", C, "resnet18.pth");
    assert_eq!(
        stdout_line(&pull(&[&format!("owner/name@{C}")], &env)),
        format!("{}\n", at_c.display())
    );
    // The `/` of refs/pr/1 went over the wire escaped, as the hub wants it.
    let paths: Vec<String> = server.requests().into_iter().map(|r| r.path).collect();
    assert!(
        paths.contains(&"/api/models/owner/name/revision/refs%2Fpr%2F1".to_string()),
        "{paths:?}"
    );
}

#[test]
fn hub_errors_say_what_the_hub_answered() {
    let (server, _, st) = local_hub();
    let home = tempfile::tempdir().unwrap();
    let endpoint = PathBuf::from(server.endpoint());
    let env = [
        ("HF_HOME", home.path()),
        ("HF_ENDPOINT", endpoint.as_path()),
    ];
    let failed = |args: &[&str], vars: &[(&str, &Path)]| {
        let out = pull(args, vars);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        stderr(&out)
    };
    let e = failed(&["someone/absent"], &env);
    assert!(
        e.contains(&format!(
            "the hub at {} has no repo someone/absent (404)",
            server.endpoint()
        )),
        "{e}"
    );
    let e = failed(&["owner/name", "--file", "nope.bin"], &env);
    assert!(
        e.contains("owner/name@main has no file nope.bin (404"),
        "{e}"
    );
    let e = failed(&["owner/name@nobranch"], &env);
    assert!(e.contains("owner/name has no revision nobranch"), "{e}");

    let e = failed(&["owner/gated"], &env);
    assert!(
        e.contains("owner/gated is gated or private: the hub answered 401")
            && e.contains("set HF_TOKEN"),
        "{e}"
    );
    let wrong = [env[0], env[1], ("HF_TOKEN", Path::new("hf_wrong"))];
    let e = failed(&["owner/gated"], &wrong);
    assert!(e.contains("has no access"), "{e}");
    assert!(
        !home
            .path()
            .join("hub/models--owner--gated/snapshots")
            .exists(),
        "nothing cached from refusals"
    );

    server.clear_requests();
    let right = [env[0], env[1], ("HF_TOKEN", Path::new("hf_secret"))];
    let path = snapshot(home.path(), "owner/gated", A, "model.safetensors");
    assert_eq!(
        stdout_line(&pull(&["owner/gated"], &right)),
        format!("{}\n", path.display())
    );
    assert_eq!(std::fs::read(&path).unwrap(), st);
    // The token went to the hub; the CDN is on the same host here, so it went there too.
    let hub_requests: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| !r.path.starts_with("/cdn/"))
        .collect();
    assert_eq!(hub_requests.len(), 3);
    for r in hub_requests {
        assert_eq!(
            r.headers.get("authorization").map(String::as_str),
            Some("Bearer hf_secret"),
            "{}",
            r.path
        );
    }
}

#[test]
fn an_interrupted_download_is_never_taken_for_the_file() {
    let (server, bin, _) = local_hub();
    let home = tempfile::tempdir().unwrap();
    let endpoint = PathBuf::from(server.endpoint());
    let env = [
        ("HF_HOME", home.path()),
        ("HF_ENDPOINT", endpoint.as_path()),
    ];
    let offline = [("HF_HOME", home.path()), ("HF_HUB_OFFLINE", Path::new("1"))];
    let path = snapshot(home.path(), "owner/name", A, "pytorch_model.bin");
    let blobs = home.path().join("hub/models--owner--name/blobs");
    let sha = sha256_hex(&bin);

    server.drop_next_download_after(100_000);
    let out = pull(&["owner/name"], &env);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("the download of pytorch_model.bin was interrupted"),
        "{}",
        stderr(&out)
    );
    assert!(
        !path.exists() && !blobs.join(&sha).exists(),
        "no file where the checkpoint goes"
    );
    assert_eq!(
        std::fs::metadata(blobs.join(format!("{sha}.part")))
            .unwrap()
            .len(),
        100_000
    );
    let out = pull(&["owner/name"], &offline);
    assert_eq!(
        out.status.code(),
        Some(2),
        "offline, the partial file is not the file"
    );

    // The next run resumes where the first stopped.
    server.clear_requests();
    assert_eq!(
        stdout_line(&pull(&["owner/name"], &env)),
        format!("{}\n", path.display())
    );
    assert_eq!(std::fs::read(&path).unwrap(), bin);
    let ranges: Vec<String> = server
        .requests()
        .iter()
        .filter_map(|r| r.headers.get("range").cloned())
        .collect();
    assert!(ranges.contains(&"bytes=100000-".to_string()), "{ranges:?}");

    // A resume that a server answers with the whole file gives bytes of
    // the wrong SHA-256: refused and removed, then downloaded afresh.
    let home = tempfile::tempdir().unwrap();
    let env = [
        ("HF_HOME", home.path()),
        ("HF_ENDPOINT", endpoint.as_path()),
    ];
    let path = snapshot(home.path(), "owner/name", A, "pytorch_model.bin");
    server.drop_next_download_after(100_000);
    assert_eq!(pull(&["owner/name"], &env).status.code(), Some(2));
    server.ignore_resumes(true);
    let out = pull(&["owner/name"], &env);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains(&format!("not the {sha} the hub named")),
        "{}",
        stderr(&out)
    );
    assert!(
        !path.exists() && std::fs::read_link(&path).is_err(),
        "the mismatching file is gone"
    );
    assert_eq!(
        pull(
            &["owner/name"],
            &[("HF_HOME", home.path()), ("HF_HUB_OFFLINE", Path::new("1"))]
        )
        .status
        .code(),
        Some(2)
    );
    server.ignore_resumes(false);
    assert_eq!(
        stdout_line(&pull(&["owner/name"], &env)),
        format!("{}\n", path.display())
    );
    assert_eq!(std::fs::read(&path).unwrap(), bin);
}
