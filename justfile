# Recipes for idkm. `just --list` shows them.

# The test suite (what CI runs after the PTX check).
test:
    cargo test

# The readers against ITERS seeded corruptions per seed file (CI runs 300).
fuzz ITERS="20000":
    IDKM_FUZZ_ITERS={{ITERS}} cargo test --release --test fuzz

# Everything CI runs, as CI runs it.
ci:
    bash .ci/run

# Cluster the built-in example layer and print a summary.
demo:
    cargo run --release -- cluster

# The layer benchmark (DKM vs IDKM vs IDKM-JFB); SIZES e.g. 65536 for a quick look.
bench SIZES="65536,589824,2359296" BUDGET="12":
    IDKM_BENCH_SIZES={{SIZES}} IDKM_BENCH_BUDGET_GIB={{BUDGET}} cargo bench --profile dev --bench layer

# Compile kernels/*.cu to PTX for sm_87 and sm_90 and fail on spills.
ptx-check:
    bash scripts/ptx-check.sh

# With cargo here it builds and stages the test binary in .gpu-stage/; with a
# GPU here it runs it (MODE build or run for one half; a GPU machine without
# Rust runs `bash scripts/gpu-check.sh run` with .gpu-stage carried along).
#
# GPU check: kernels vs CPU twins, IDKM on CUDA, ResNet18 step, layer benchmark.
gpu-check MODE="auto":
    bash scripts/gpu-check.sh {{MODE}}

# Needs nvcc: CUDA_HOME, else the PyPI install of scripts/ptx-check.sh; links
# against generated stubs when the CUDA libraries are not installed.
#
# Build the idkm binary with --features cuda for compute capability CAP.
build-gpu CAP="90":
    CUDA_COMPUTE_CAP={{CAP}} bash scripts/gpu-check.sh build-bin

# On a Jetson Orin (aarch64), with JetPack's CUDA and nvcc, for sm_87. DATA:
# the CIFAR-10 directory; MODEL: a float checkpoint to start from (`idkm
# train` output or a hub id; empty = fresh initialisation). Peak memory:
# tegrastats' board RAM (CPU and GPU share it) and /usr/bin/time's peak RSS.
# Written without a Jetson at hand: not yet run on one.
#
# Quantize ResNet18 on CIFAR-10 with 4-bit IDKM on a Jetson Orin; write a peak-memory report.
train-jetson DATA="data/cifar-10-batches-bin" MODEL="" EPOCHS="1" BATCH="32" REPORT="jetson-memory-report.txt":
    #!/usr/bin/env bash
    set -euo pipefail
    export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
    export PATH="$CUDA_HOME/bin:$PATH" CUDA_COMPUTE_CAP=87
    command -v nvcc >/dev/null || { echo "no nvcc in $CUDA_HOME/bin: install JetPack's CUDA toolkit (nvidia-jetpack) or set CUDA_HOME" >&2; exit 1; }
    target="${CARGO_TARGET_DIR:-target}"
    cargo build --release --features cuda
    model=(); [ -n "{{MODEL}}" ] && model=(--model "{{MODEL}}")
    logs="$(mktemp -d)"
    # CPU and GPU share the board's RAM: tegrastats' RAM line is the number that matters.
    ram_base=""; tpid=""
    if command -v tegrastats >/dev/null; then
        ram_base="$(free -m | awk '/^Mem:/ { print $3 }')"
        tegrastats --interval 500 --logfile "$logs/tegrastats.log" & tpid=$!
    fi
    timer=(); [ -x /usr/bin/time ] && timer=(/usr/bin/time -v -o "$logs/time.txt")
    cmd=("${timer[@]}" "$target/release/idkm" quantize --device cuda --data "{{DATA}}" "${model[@]}" --arch resnet18-cifar \
         --bits 4 --method idkm --batch-size {{BATCH}} --epochs {{EPOCHS}} --output idkm-jetson-4bit.safetensors)
    set +e
    "${cmd[@]}" 2>&1 | tee "$logs/train.log"
    rc=${PIPESTATUS[0]}
    set -e
    [ -n "$tpid" ] && kill "$tpid" 2>/dev/null || true
    {
        echo "idkm quantize on $(tr -d '\0' </proc/device-tree/model 2>/dev/null || uname -m), $(date -u +%FT%TZ), exit code $rc"
        echo "command: ${cmd[*]}"
        echo "nvcc: $(nvcc --version | tail -2 | head -1)"
        echo
        grep -E '^(epoch|[ ]*[0-9]+ )' "$logs/train.log" || true
        if [ -s "$logs/tegrastats.log" ]; then
            peak="$(grep -o 'RAM [0-9]*/[0-9]*MB' "$logs/tegrastats.log" | awk -F'[ /]' '{ print $2 }' | sort -n | tail -1)"
            total="$(grep -o 'RAM [0-9]*/[0-9]*MB' "$logs/tegrastats.log" | head -1 | awk -F'[ /M]' '{ print $3 }')"
            echo "board RAM (CPU + GPU, tegrastats): peak ${peak} MiB of ${total} MiB; ${ram_base} MiB in use before the start"
        fi
        [ -s "$logs/time.txt" ] && grep -E 'Maximum resident|Elapsed' "$logs/time.txt"
    } | tee "{{REPORT}}"
    echo "report written to {{REPORT}} (full logs in $logs)"
    exit "$rc"
