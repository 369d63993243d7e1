#!/usr/bin/env bash
# The GPU check, run on a CUDA machine (e.g. the lent H200) from the repository root:
#   bash benchmarks/gpu_check.sh            # results in ${OUT:-/tmp/gpu_check}
# 1. installs missing wheels carried in .whl/ (bitsandbytes, datasets and their needs) if present,
# 2. runs the test suite's GPU-marked tests,
# 3. runs the kernel benchmark on CUDA (ours vs bitsandbytes) and on the host CPU,
# 4. runs the quickstart pipeline on CUDA (nf4 native, nf4 bitsandbytes backend, LoRA baseline)
#    and prints each run's step time and peak CUDA memory.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 QLORA_PLUGINS_HOME="$OUT/home"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('device:', torch.cuda.get_device_name(0))" || exit 2

python3 -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log"
python3 benchmarks/quant.py --device cuda > "$OUT/quant_cuda.json"; cat "$OUT/quant_cuda.json"
python3 benchmarks/quant.py --device cpu --repeats 5 > "$OUT/quant_cpu.json"
for variant in "nf4:native" "nf4:bitsandbytes" "none:native"; do
  q=${variant%%:*}; backend=${variant##*:}
  extra=(); [ "$q" = nf4 ] && extra=(--set "quantizer.backend=$backend")
  [ "$q" = none ] && extra=(--set "quantizer=none")
  python3 -c "from qlora_plugins.cli import main; main()" run examples/quickstart.yaml --set train.device=cuda \
    --set train.max_steps=40 "${extra[@]}" -o "$OUT/run-$q-$backend" --force --no-progress --json > "$OUT/run-$q-$backend.json" \
    && python3 - "$OUT/run-$q-$backend.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(json.dumps({"run": sys.argv[1], "quantizer": r["plugins"]["quantizer"]["name"], "backend": r["quantization"].get("backend"),
                  "median_step_time_s": r["training"]["median_step_time_s"], "last_loss": r["training"]["last_loss"],
                  "cuda_peak_allocated_bytes": r["memory"].get("cuda_peak_allocated_bytes")}))
PY
done
