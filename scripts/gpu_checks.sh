#!/usr/bin/env bash
# The GPU checks of issues 6 and 17, as one prepared run for a lent GPU machine (docs/benchmarks.md, "GPU checks").
# Installs nothing: expects the test environment (bash scripts/setup.sh test) with a CUDA build of torch and
# nvidia-ml-py. Writes the pytest report and nvidia-smi's view under ${OUT:-gpu-checks}/.
set -u
out="${OUT:-gpu-checks}"
mkdir -p "$out"
python="${PYTHON:-.venv/bin/python}"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
"$python" - > "$out/torch.txt" 2>&1 <<'PY'
import torch
print(torch.__version__, torch.version.cuda, torch.cuda.device_count(),
      [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
PY
# -m gpu: every test that needs a CUDA device; the NVML collector against the real driver as well
"$python" -m pytest -q -p no:cacheprovider -m "gpu" -rs --junitxml "$out/gpu.xml" tests \
    tests/agent/test_gpus.py::test_the_real_collector_says_why_there_are_no_gpus_here 2>&1 | tee "$out/gpu.txt"
exit "${PIPESTATUS[0]}"
