#!/usr/bin/env bash
# Compiles every kernels/*.cu to PTX for sm_87 and sm_90, assembles each PTX
# with `ptxas -v`, prints one line per kernel and architecture (registers,
# stack frame, spill stores/loads, local and shared memory) and fails if any
# kernel spills or uses local memory (stack frame or lmem > 0).
#
# Needs no GPU. With CUDA_HOME set, uses $CUDA_HOME/bin/{nvcc,ptxas} and
# installs nothing. Otherwise installs the CUDA 13.0 compiler from PyPI into
# $IDKM_CUDA_DIR (default /var/tmp/idkm-cuda) once, and reuses it afterwards.
#
# Usage: scripts/ptx-check.sh            (from anywhere in the repository)
# Env:   CUDA_HOME, IDKM_CUDA_DIR, PTX_ARCHS (default "87 90"), NVCC_FLAGS (extra flags)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ARCHS="${PTX_ARCHS:-87 90}"
DIR="${IDKM_CUDA_DIR:-/var/tmp/idkm-cuda}"

die() { echo "ptx-check: $*" >&2; exit 1; }

# Finds a directory holding bin/nvcc and bin/ptxas under $1.
find_cuda_home() {
    local nvcc
    for nvcc in "$1/nvidia/cu13/bin/nvcc" $(find "$1" -path '*/bin/nvcc' -type f 2>/dev/null); do
        if [[ -x "$nvcc" && -x "$(dirname "$nvcc")/ptxas" ]]; then
            dirname "$(dirname "$nvcc")"
            return 0
        fi
    done
    return 1
}

if [[ -z "${CUDA_HOME:-}" ]]; then
    if ! CUDA_HOME="$(find_cuda_home "$DIR")"; then
        mkdir -p "$DIR"
        log="$DIR/pip-install.log"
        # The 13.0 series of each wheel (PyPI: nvcc/nvvm/crt 13.0.48 and 13.0.88,
        # runtime up to 13.0.96, cccl 13.0.50 and 13.0.85); pip takes the newest.
        if ! python3 -m pip install --quiet --upgrade --disable-pip-version-check --no-warn-script-location \
            --target "$DIR" \
            'nvidia-cuda-nvcc==13.0.*' 'nvidia-cuda-runtime==13.0.*' 'nvidia-cuda-cccl==13.0.*' \
            'nvidia-nvvm==13.0.*' 'nvidia-cuda-crt==13.0.*' >"$log" 2>&1; then
            cat "$log" >&2
            die "pip install of the CUDA compiler into $DIR failed"
        fi
        CUDA_HOME="$(find_cuda_home "$DIR")" || die "no bin/nvcc with bin/ptxas under $DIR after installing"
    fi
fi
NVCC="$CUDA_HOME/bin/nvcc"
PTXAS="$CUDA_HOME/bin/ptxas"
[[ -x "$NVCC" ]] || die "$NVCC not found (CUDA_HOME=$CUDA_HOME)"
[[ -x "$PTXAS" ]] || die "$PTXAS not found (CUDA_HOME=$CUDA_HOME)"

shopt -s nullglob
SOURCES=("$ROOT"/kernels/*.cu)
(( ${#SOURCES[@]} > 0 )) || die "no kernels/*.cu"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

REPORT="$WORK/report.tsv"
: >"$REPORT"
for src in "${SOURCES[@]}"; do
    name="$(basename "$src" .cu)"
    for arch in $ARCHS; do
        ptx="$WORK/$name.sm_$arch.ptx"
        # shellcheck disable=SC2086
        if ! "$NVCC" --ptx -arch="sm_$arch" -O3 -std=c++17 ${NVCC_FLAGS:-} -I "$ROOT/kernels" \
            -o "$ptx" "$src" 2>"$WORK/nvcc.log"; then
            cat "$WORK/nvcc.log" >&2
            die "nvcc failed on kernels/$name.cu for sm_$arch"
        fi
        if ! "$PTXAS" -v -arch="sm_$arch" -o "$WORK/out.cubin" "$ptx" 2>"$WORK/ptxas.log"; then
            cat "$WORK/ptxas.log" >&2
            die "ptxas failed on kernels/$name.cu for sm_$arch"
        fi
        # ptxas -v prints, per entry function:
        #   Compiling entry function 'K' for 'sm_90'
        #   Function properties for K
        #       S bytes stack frame, T bytes spill stores, U bytes spill loads
        #   Used R registers, [used B barriers,] [L bytes lmem,] [M bytes smem,] ...
        awk -v file="$name.cu" -v arch="sm_$arch" '
            /Compiling entry function/ {
                match($0, /function '\''[^'\'']+'\''/)
                kernel = substr($0, RSTART + 10, RLENGTH - 11)
                stack = spst = spld = lmem = smem = 0
            }
            /bytes stack frame/ {
                for (i = 1; i <= NF; i++) {
                    if ($(i + 1) == "bytes" && $(i + 2) == "stack") stack = $i
                    if ($(i + 1) == "bytes" && $(i + 2) == "spill" && $(i + 3) ~ /^stores/) spst = $i
                    if ($(i + 1) == "bytes" && $(i + 2) == "spill" && $(i + 3) ~ /^loads/) spld = $i
                }
            }
            /Used [0-9]+ registers/ {
                for (i = 1; i <= NF; i++) {
                    if ($i == "Used") regs = $(i + 1)
                    if ($(i + 1) == "bytes" && $(i + 2) ~ /^lmem/) lmem = $i
                    if ($(i + 1) == "bytes" && $(i + 2) ~ /^smem/) smem = $i
                }
                printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", kernel, arch, regs, stack, spst, spld, lmem, smem, file
            }
        ' "$WORK/ptxas.log" >>"$REPORT"
    done
done

[[ -s "$REPORT" ]] || die "ptxas reported no entry functions"

sort -t $'\t' -k9,9 -k1,1 -k2,2 "$REPORT" | awk -F '\t' '
    BEGIN {
        printf "%-28s %-6s %5s %6s %9s %9s %5s %6s\n", "kernel", "arch", "regs", "stack", "spill_st", "spill_ld", "lmem", "smem"
    }
    {
        bad = ($4 > 0 || $5 > 0 || $6 > 0 || $7 > 0)
        printf "%-28s %-6s %5d %6d %9d %9d %5d %6d%s\n", $1, $2, $3, $4, $5, $6, $7, $8, bad ? "  <-- FAIL" : ""
        if (bad) fails++
    }
    END {
        if (fails) { printf "ptx-check: %d kernel(s) spill or use local memory\n", fails; exit 1 }
    }
'
