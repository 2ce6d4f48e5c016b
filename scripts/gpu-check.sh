#!/usr/bin/env bash
# GPU check of the CUDA path: every kernel against its CPU twin, the whole
# IDKM forward/backward on CUDA against the CPU, a ResNet18 training step,
# then the layer benchmark (DKM t = 1/5/10/30 vs IDKM vs IDKM-JFB at
# m = 2,359,296, k = 16 and 256: time and peak device memory); prints one
# short table at the end.
#
# Two halves, so that a GPU machine without a Rust toolchain (or without
# network) can run the check:
#
#   build   (a machine with cargo; no GPU needed) compiles tests/gpu.rs with
#           --features cuda in release mode and stages the binary in
#           .gpu-stage/ (git-ignored through .git/info/exclude). Without a
#           CUDA toolkit it installs the CUDA 13.0 compiler from PyPI
#           (scripts/ptx-check.sh), and without the CUDA libraries it links
#           against generated stubs (libcuda, libcublas, libcublasLt,
#           libcurand, libnvrtc: empty functions with the real SONAMEs); the
#           real libraries are loaded on the GPU machine.
#   run     (the GPU machine; no cargo needed) points LD_LIBRARY_PATH at the
#           CUDA libraries of its Python environment (the nvidia-* wheels that
#           PyTorch uses) and the driver's libcuda, runs the staged binary:
#           the tests, the ResNet18 step, the benchmark. Logs go to $OUT (if
#           set) or .gpu-stage/logs.
#   build-bin  builds the `idkm` binary with --features cuda (`just build-gpu`).
#
# With no argument: build if cargo is here, then run if a GPU is here.
#
# Build here, copy the repository (with .gpu-stage/) to the GPU machine,
# run there:
#   bash scripts/gpu-check.sh build
#   rsync -a ./ gpu-host:idkm/ && ssh gpu-host 'cd idkm && bash scripts/gpu-check.sh run'
#
# Env: CUDA_HOME (a CUDA toolkit; default: the PyPI install of ptx-check.sh),
#      CUDA_COMPUTE_CAP (default 90), CARGO_TARGET_DIR (default
#      /var/tmp/idkm-cuda-target), IDKM_GPU_BENCH_SIZES (default 2359296),
#      IDKM_GPU_BENCH_BITS (default 4,8), IDKM_GPU_BENCH_REPS (default 3),
#      IDKM_GPU_BENCH_BUDGET_GIB (default 100); time limits in seconds of the
#      three phases: GPU_CHECK_TESTS_S (180), GPU_CHECK_RESNET_S (120),
#      GPU_CHECK_BENCH_S (150): at most 7.5 minutes in all.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STAGE="$ROOT/.gpu-stage"
die() { echo "gpu-check: $*" >&2; exit 1; }
say() { echo "gpu-check: $*" >&2; }

# ----------------------------------------------------------------------------
# Build side

# Sets CUDA_HOME (and PATH) to a toolkit with nvcc.
setup_toolkit() {
    if [[ -z "${CUDA_HOME:-}" ]]; then
        if command -v nvcc >/dev/null 2>&1; then
            CUDA_HOME="$(cd "$(dirname "$(command -v nvcc)")/.." && pwd)"
        else
            # Installs the CUDA 13.0 compiler from PyPI once (and checks the
            # kernels for spills while at it).
            bash "$ROOT/scripts/ptx-check.sh" >/dev/null
            CUDA_HOME="${IDKM_CUDA_DIR:-/var/tmp/idkm-cuda}/nvidia/cu13"
        fi
    fi
    [[ -x "$CUDA_HOME/bin/nvcc" ]] || die "no nvcc in CUDA_HOME=$CUDA_HOME"
    export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
    export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/idkm-cuda-target}"
}

# Whether the linker can find lib$1.so in the toolkit or the system.
have_lib() {
    local d
    for d in "$CUDA_HOME/lib" "$CUDA_HOME/lib64" "$CUDA_HOME/lib/stubs" "$CUDA_HOME/lib64/stubs" \
             "$CUDA_HOME/targets/x86_64-linux/lib" "$CUDA_HOME/targets/x86_64-linux/lib/stubs"; do
        [[ -e "$d/lib$1.so" ]] && return 0
    done
    ldconfig -p 2>/dev/null | grep -q "lib$1\.so " && return 0
    return 1
}

# Link stubs for the CUDA libraries that candle links dynamically (through
# cudarc's `dynamic-linking` and candle-kernels' -lcudart), in
# $CUDA_HOME/lib/stubs, which cudarc's build script puts on the link path.
# Each stub defines every function of cudarc's bindings of that library as an
# empty function and carries the real library's SONAME, so the binary asks
# the dynamic loader for the real one. Never put lib/stubs on
# LD_LIBRARY_PATH.
make_stubs() {
    local major cudarc stubs tmp spec lib module soname
    major="$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')"
    [[ -n "$major" ]] || die "cannot read the CUDA version from nvcc --version"
    # candle-kernels links -lcudart: the runtime wheel ships only libcudart.so.N.
    if ! have_lib cudart; then
        local rt
        rt="$(ls "$CUDA_HOME"/lib/libcudart.so.* 2>/dev/null | head -1)"
        [[ -n "$rt" ]] || die "no libcudart.so.* in $CUDA_HOME/lib"
        ln -sf "$(basename "$rt")" "$CUDA_HOME/lib/libcudart.so"
    fi
    cargo fetch --manifest-path "$ROOT/Cargo.toml" >/dev/null 2>&1 || true
    cudarc="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-* 2>/dev/null | sort -V | tail -1)"
    stubs="$CUDA_HOME/lib/stubs"
    mkdir -p "$stubs"
    tmp="$(mktemp -d)"
    for spec in "cuda:driver:libcuda.so.1" "cublas:cublas:libcublas.so.$major" "cublasLt:cublaslt:libcublasLt.so.$major" \
                "curand:curand:libcurand.so.10" "nvrtc:nvrtc:libnvrtc.so.$major"; do
        IFS=: read -r lib module soname <<<"$spec"
        have_lib "$lib" && continue
        [[ -n "$cudarc" && -f "$cudarc/src/$module/sys/mod.rs" ]] \
            || die "lib$lib.so is missing and cudarc's bindings ($cudarc/src/$module/sys/mod.rs) are not there to make a stub"
        grep -oE '^pub unsafe fn [A-Za-z_][A-Za-z0-9_]*' "$cudarc/src/$module/sys/mod.rs" \
            | awk '{ print "void " $4 "(void) {}" }' | sort -u >"$tmp/$lib.c"
        cc -shared -fPIC -o "$stubs/lib$lib.so" -Wl,-soname,"$soname" "$tmp/$lib.c"
        say "made a link stub $stubs/lib$lib.so (SONAME $soname, $(wc -l <"$tmp/$lib.c") functions)"
    done
    rm -rf "$tmp"
}

build() {
    command -v cargo >/dev/null || die "cargo not found: build on a machine with a Rust toolchain"
    setup_toolkit
    make_stubs
    say "building tests/gpu.rs (release, --features cuda, sm_$CUDA_COMPUTE_CAP) in $CARGO_TARGET_DIR"
    local log bin
    log="$(mktemp)"
    if ! (cd "$ROOT" && cargo test --release --features cuda --test gpu --no-run) >"$log" 2>&1; then
        cat "$log" >&2
        die "build failed"
    fi
    bin="$(sed -n 's/.*Executable tests\/gpu.rs (\(.*\))$/\1/p' "$log" | tail -1)"
    rm -f "$log"
    [[ -x "$bin" ]] || die "no test executable found in cargo's output"
    mkdir -p "$STAGE"
    # The staged binary is a build output: keep it out of git.
    local exclude="$ROOT/.git/info/exclude"
    if [[ -d "$ROOT/.git" ]] && ! grep -qx '/.gpu-stage/' "$exclude" 2>/dev/null; then
        echo '/.gpu-stage/' >>"$exclude"
    fi
    rm -f "$STAGE/gpu-tests" "$STAGE/gpu-tests.gz"
    cp "$bin" "$STAGE/gpu-tests"
    strip --strip-debug "$STAGE/gpu-tests" 2>/dev/null || true
    gzip -9 "$STAGE/gpu-tests"
    {
        echo "built $(date -u +%FT%TZ) from $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet 2>/dev/null || echo '+changes')"
        echo "sm_$CUDA_COMPUTE_CAP, $("$CUDA_HOME/bin/nvcc" --version | tail -2 | head -1)"
        echo "needs: $(readelf -d "$bin" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')"
    } >"$STAGE/manifest.txt"
    say "staged $(du -h "$STAGE/gpu-tests.gz" | cut -f1) in $STAGE ($(du -sh "$STAGE" | cut -f1) in all): copy it to the GPU machine with the checkout"
    cat "$STAGE/manifest.txt" >&2
}

build_bin() {
    command -v cargo >/dev/null || die "cargo not found"
    setup_toolkit
    make_stubs
    (cd "$ROOT" && cargo build --release --features cuda)
    say "built $CARGO_TARGET_DIR/release/idkm (sm_$CUDA_COMPUTE_CAP)"
}

# ----------------------------------------------------------------------------
# GPU side

# LD_LIBRARY_PATH with the CUDA libraries of the Python environment (the
# nvidia-* wheels: nvidia/cu13/lib, or nvidia/<name>/lib in older layouts),
# a system toolkit, and the driver's libcuda.
setup_libs() {
    local dirs=() d py
    for py in python3 /opt/torch/.venv/bin/python3; do
        command -v "$py" >/dev/null 2>&1 || continue
        while IFS= read -r d; do [[ -n "$d" ]] && dirs+=("$d"); done < <("$py" - <<'EOF' 2>/dev/null
import glob, os, site, sys
roots = set(site.getsitepackages() + [site.getusersitepackages()] + [p for p in sys.path if os.path.isdir(os.path.join(p, "nvidia"))])
for root in sorted(roots):
    for lib in sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib"))):
        if glob.glob(os.path.join(lib, "lib*.so*")):
            print(lib)
EOF
        )
    done
    for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do
        [[ -d "$d" ]] && dirs+=("$d")
    done
    if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 '; then
        d="$(find /usr/local/nvidia /usr/lib /usr/lib64 /usr/lib/x86_64-linux-gnu -name 'libcuda.so.1' 2>/dev/null | head -1 || true)"
        [[ -n "$d" ]] && dirs+=("$(dirname "$d")")
    fi
    local joined
    joined="$(printf '%s:' "${dirs[@]}")"
    export LD_LIBRARY_PATH="${joined%:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}

# For each library the binary needs and the loader cannot find, links a
# neighbouring major version of it (e.g. libcurand.so.10 -> .so.11) into a
# compat folder, and says so.
fix_missing() {
    local bin="$1" compat="$2" missing lib base found d
    missing="$(ldd "$bin" 2>/dev/null | awk '/not found/ { print $1 }')"
    [[ -z "$missing" ]] && return 0
    mkdir -p "$compat"
    for lib in $missing; do
        base="${lib%%.so*}"
        found=""
        for d in ${LD_LIBRARY_PATH//:/ }; do
            found="$(ls "$d/$base".so.* 2>/dev/null | head -1 || true)"
            [[ -n "$found" ]] && break
        done
        if [[ -n "$found" ]]; then
            ln -sf "$found" "$compat/$lib"
            say "WARNING: $lib not found; using $found in its place"
        else
            say "ERROR: $lib not found in LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
        fi
    done
    export LD_LIBRARY_PATH="$compat:$LD_LIBRARY_PATH"
}

run() {
    [[ -f "$STAGE/gpu-tests.gz" || -x "$STAGE/gpu-tests" ]] \
        || die "nothing staged in $STAGE: run 'bash scripts/gpu-check.sh build' on a machine with cargo first (and carry .gpu-stage)"
    local logs="${OUT:-$STAGE/logs}" work bin
    mkdir -p "$logs"
    work="$(mktemp -d)"
    bin="$work/gpu-tests"
    if [[ -f "$STAGE/gpu-tests.gz" ]]; then gunzip -c "$STAGE/gpu-tests.gz" >"$bin"; else cp "$STAGE/gpu-tests" "$bin"; fi
    chmod +x "$bin"
    cat "$STAGE/manifest.txt" 2>/dev/null || true
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || say "nvidia-smi did not answer"
    setup_libs
    fix_missing "$bin" "$work/compat"
    ldd "$bin" | grep -E 'cuda|cublas|curand|nvrtc' >"$logs/ldd.txt" || true
    cat "$logs/ldd.txt"
    if ldd "$bin" 2>/dev/null | grep -q 'not found'; then
        die "CUDA libraries missing (see above): install PyTorch's nvidia-* wheels or a CUDA toolkit, or set LD_LIBRARY_PATH"
    fi

    local rc_tests=0 rc_resnet=0 rc_bench=0
    say "tests (kernels vs CPU twins, backward, layer) ..."
    set +e
    timeout "${GPU_CHECK_TESTS_S:-180}" "$bin" --skip resnet18_training_step_on_cuda --nocapture >"$logs/tests.log" 2>&1
    rc_tests=$?
    say "ResNet18 training step ..."
    timeout "${GPU_CHECK_RESNET_S:-120}" "$bin" --exact resnet18_training_step_on_cuda --nocapture --test-threads=1 >"$logs/resnet.log" 2>&1
    rc_resnet=$?
    say "layer benchmark ..."
    timeout "${GPU_CHECK_BENCH_S:-150}" "$bin" --ignored --exact layer_bench --nocapture --test-threads=1 >"$logs/bench.log" 2>&1
    rc_bench=$?
    set -e

    echo
    echo "== tests (rc $rc_tests) =="
    grep -E 'worst rel err|rel err .*(gpu|GPU)|FAILED|panicked|^test result' "$logs/tests.log" || tail -20 "$logs/tests.log"
    grep -A25 -E '^---- .* stdout ----' "$logs/tests.log" | head -60 || true
    echo "== ResNet18 (rc $rc_resnet) =="
    grep -E 'resnet18|^test result|panicked' "$logs/resnet.log" || tail -20 "$logs/resnet.log"
    echo "== layer benchmark (rc $rc_bench) =="
    if grep -q '^layer benchmark on' "$logs/bench.log"; then
        sed -n '/^layer benchmark on/,$p' "$logs/bench.log" | grep -E '^layer|^\|'
    else
        tail -30 "$logs/bench.log"
    fi
    rm -rf "$work"
    (( rc_tests == 0 && rc_resnet == 0 && rc_bench == 0 )) || die "a phase failed (tests $rc_tests, resnet $rc_resnet, bench $rc_bench; 124 = timed out); logs in $logs"
}

case "${1:-auto}" in
    build) build ;;
    build-bin) build_bin ;;
    run) run ;;
    auto)
        command -v cargo >/dev/null 2>&1 && build
        if nvidia-smi -L >/dev/null 2>&1; then
            run
        else
            say "no GPU here: staged only. On a GPU machine: bash scripts/gpu-check.sh run (with .gpu-stage carried along)"
        fi
        ;;
    *) die "usage: scripts/gpu-check.sh [build|run|build-bin]" ;;
esac
