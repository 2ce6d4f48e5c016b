//! Build script: under the `cuda` feature only, compiles `kernels/*.cu` to PTX
//! with nvcc into OUT_DIR (`src/cluster/cuda.rs` embeds them with
//! `include_str!`). Without the feature it does nothing, so CPU builds need
//! no CUDA toolkit.
//!
//! Env:
//! - `CUDA_COMPUTE_CAP`: target compute capability, default 90 (H100/H200);
//!   87 for Jetson Orin. `sm_XX` and `8.7` are accepted too.
//! - `NVCC`: the compiler to use; else `$CUDA_HOME/bin/nvcc` (or
//!   `CUDA_PATH`, `CUDA_ROOT`), else `nvcc` on the PATH, else
//!   `/usr/local/cuda/bin/nvcc`.
//! - `IDKM_NVCC_FLAGS`: extra nvcc flags, split on whitespace.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The kernel sources; each becomes `OUT_DIR/<name>.ptx`.
const KERNELS: [&str; 2] = ["soft_assign", "adjoint"];
const HEADERS: [&str; 1] = ["common.cuh"];
const ENV: [&str; 6] = [
    "CUDA_COMPUTE_CAP",
    "NVCC",
    "CUDA_HOME",
    "CUDA_PATH",
    "CUDA_ROOT",
    "IDKM_NVCC_FLAGS",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-changed=kernels");
    for k in KERNELS {
        println!("cargo:rerun-if-changed=kernels/{k}.cu");
    }
    for h in HEADERS {
        println!("cargo:rerun-if-changed=kernels/{h}");
    }
    for v in ENV {
        println!("cargo:rerun-if-env-changed={v}");
    }
    if let Err(e) = build() {
        eprintln!("\nidkm build.rs (feature `cuda`): {e}\n");
        std::process::exit(1);
    }
}

fn build() -> Result<(), String> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?);
    let out = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let arch = compute_cap()?;
    let nvcc = find_nvcc().ok_or_else(|| {
        "nvcc not found. The `cuda` feature compiles kernels/*.cu with the CUDA compiler: set CUDA_HOME \
         (so that $CUDA_HOME/bin/nvcc exists) or NVCC, or put nvcc on the PATH. Without a CUDA install, \
         `bash scripts/ptx-check.sh` installs the CUDA 13.0 compiler from PyPI into /var/tmp/idkm-cuda; then \
         export CUDA_HOME=/var/tmp/idkm-cuda/nvidia/cu13 PATH=$CUDA_HOME/bin:$PATH"
            .to_string()
    })?;
    let extra: Vec<String> = env::var("IDKM_NVCC_FLAGS")
        .map(|s| s.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    for name in KERNELS {
        let src = root.join("kernels").join(format!("{name}.cu"));
        let ptx = out.join(format!("{name}.ptx"));
        // Same flags as scripts/ptx-check.sh (no --use_fast_math: the CPU
        // twins use IEEE expf, sqrtf and division).
        let output = Command::new(&nvcc)
            .arg("--ptx")
            .arg(format!("-arch=sm_{arch}"))
            .args(["-O3", "-std=c++17", "-I"])
            .arg(root.join("kernels"))
            .args(&extra)
            .arg("-o")
            .arg(&ptx)
            .arg(&src)
            .output()
            .map_err(|e| format!("running {}: {e}", nvcc.display()))?;
        if !output.status.success() {
            return Err(format!(
                "{} failed on {} for sm_{arch}:\n{}{}",
                nvcc.display(),
                src.display(),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
    }
    println!("cargo:rustc-env=IDKM_CUDA_ARCH=sm_{arch}");
    Ok(())
}

/// `CUDA_COMPUTE_CAP` as the digits of an `sm_XX` target (default 90).
fn compute_cap() -> Result<String, String> {
    let raw = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let digits: String = raw
        .trim()
        .trim_start_matches("sm_")
        .trim_start_matches("compute_")
        .replace('.', "");
    let ok = (2..=3).contains(&digits.len())
        && digits.chars().all(|c| c.is_ascii_alphanumeric())
        && digits.chars().next().is_some_and(|c| c.is_ascii_digit());
    if ok {
        Ok(digits)
    } else {
        Err(format!("CUDA_COMPUTE_CAP={raw:?} is not a compute capability (expected e.g. 90, 87, 8.7 or sm_90a)"))
    }
}

fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC") {
        return Some(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(home) = env::var_os(var) {
            let p = Path::new(&home).join("bin").join("nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let p = dir.join("nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let p = PathBuf::from("/usr/local/cuda/bin/nvcc");
    p.is_file().then_some(p)
}
