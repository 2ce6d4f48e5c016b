# Recipes for idkm. `just --list` shows them.

# The test suite (what CI runs after the PTX check).
test:
    cargo test

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
