#!/usr/bin/env bash
# The CUDA checks of one GPU session, in one call: the main throughput figure (crops on the
# device, study gpu-throughput of benchmarks/run.py), the CUDA tests, then the other pipelines
# and the evaluation memory (study eval-memory).
#
#     bash benchmarks/run_gpu.sh DLMI_FOLDER [OUT_DIR]
#
# Prints the GPU, the test summary and the studies' JSON lines (also written to OUT_DIR).
# Each step has its own time limit so one hang cannot eat a short GPU lease.
set -uo pipefail
data=${1:?usage: run_gpu.sh DLMI_FOLDER [OUT_DIR]}
out=${2:-.}
export PYTHONUNBUFFERED=1
here=$(dirname "$0")
cache=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
run() {  # run LIMIT NAME ARGS...: one gpu-throughput measurement, its lines kept in OUT/NAME.jsonl
    local limit=$1 name=$2
    shift 2
    timeout "$limit" python3 "$here/run.py" gpu-throughput --data "$data" --cache-dir "$cache" \
        --batch-size 4 --max-instances 64 --steps 100 "$@" | tee "$out/$name.jsonl"
}
run 150 gpu_throughput_on_device --cache-on-device --workers 0
timeout 200 python3 -m pytest -q -p no:cacheprovider --tb=short "$here/../tests/test_cuda.py" \
    "$here/../tests/test_gpu_path.py" "$here/../tests/test_datamodule.py::test_batch_pin_memory_on_cuda" \
    >"$out/pytest.txt" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$out/pytest.txt"
run 120 gpu_throughput_on_device_2_workers --cache-on-device --workers 2
run 120 gpu_throughput_uint8 --workers 8
timeout 60 python3 "$here/run.py" eval-memory --data "$data" --cache-dir "$cache" | tee "$out/eval_memory.jsonl"
