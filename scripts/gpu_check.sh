#!/usr/bin/env bash
# Issue 27's device check, as one short run for a lent GPU (nothing here has run on one yet):
#   1. the GPU tests (pytest -m gpu);
#   2. the bench at Mixtral-8x7B layer dimensions (d=4096, d_ff=14336, E=8, k=2, BF16: ~2.8 GB of
#      experts), the workers sharing the GPU: served against the in-process block at T = 1, 64, 1024,
#      4096, 16384 (sweep), T=1 p50, internal bytes per token, and the compute hop's rows by shared
#      memory, NIXL and bytes (transports);
#   3. GPU utilisation sampled by nvidia-smi every 100 ms for the whole bench.
# Results go to benchmarks/results/gpu/<date>/ (JSON, plots, utilisation CSV, logs).
#
# A device machine reaches no package index and its python3 holds a CUDA torch: install this project
# there from wheels downloaded here for its Python (3.12) into .whl/ (see the device tool's README):
#   python3 -m pip install --no-index --find-links .whl -e '.[test,bench,nixl]'
#   bash scripts/gpu_check.sh            # from the repository root; PYTHON=... to pick another
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
out="benchmarks/results/gpu/$(date -u +%Y-%m-%d)"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.csv"

"$python" -m pytest -m gpu -q -p no:cacheprovider tests/integration/test_gpu.py 2>&1 | tail -15 | tee "$out/pytest-gpu.log"

nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -lms 100 >"$out/utilisation.csv" &
sampler=$!
"$python" -m moe_serve bench --device cuda --dtype bfloat16 \
    --hidden-size 4096 --intermediate-size 14336 --num-experts 8 --top-k 2 --workers 2 \
    --sweep-tokens 1,64,1024,4096,16384 --throughput-tokens 4096 \
    --latency-requests 100 --throughput-requests 5 --rounds 3 \
    --sections sweep,transports --output-dir "$out" 2>&1 | tail -80 | tee "$out/bench.log"
status=${PIPESTATUS[0]}
kill "$sampler" 2>/dev/null
"$python" - "$out/utilisation.csv" <<'EOF' | tee -a "$out/bench.log"
import csv, statistics, sys
rows = [row for row in csv.reader(open(sys.argv[1])) if len(row) == 3]
busy = [float(row[1].strip().rstrip(" %")) for row in rows]
print(f"GPU utilisation over the bench: mean {statistics.mean(busy):.0f}%, samples {len(busy)}" if busy else "no samples")
EOF
exit "$status"
