#!/usr/bin/env bash
# The GPU check, run on a CUDA machine (e.g. the lent H200) from the repository root:
#   bash benchmarks/gpu_check.sh            # results in ${OUT:-/tmp/gpu_check}
# 1. installs missing wheels carried in .whl/ (bitsandbytes, datasets and their needs) if present,
# 2. runs the test suite's GPU-marked tests and the Triton kernel tests on the GPU,
# 3. runs the kernel benchmark on CUDA for each CUDA kernel choice (QLORA_PLUGINS_CUDA_KERNELS=triton,
#    bitsandbytes, torch: dequantization and the small-batch fused matmul against bitsandbytes'
#    dequantize_4bit / matmul_4bit in the same run) and on the host CPU; the per-choice medians
#    decide whether nf4/fp4 should dispatch to bitsandbytes (printed at the end),
# 4. runs the quickstart pipeline on CUDA (nf4 native with each kernel choice, nf4 bitsandbytes
#    backend = transformers' Linear4bit, LoRA baseline) and prints each run's step time and peak
#    CUDA memory,
# 5. runs DDP and FSDP on the NCCL backend (`qlora run --nproc-per-node`, one rank per GPU, at most 2).
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
python3 -m pytest -q tests/test_triton_kernels.py 2>&1 | tee "$OUT/triton_tests.log"
for k in triton bitsandbytes torch; do
  QLORA_PLUGINS_CUDA_KERNELS=$k python3 benchmarks/quant.py --device cuda --matmul-batches 1,16 > "$OUT/quant_cuda_$k.json"
done
cat "$OUT/quant_cuda_triton.json"
python3 benchmarks/quant.py --device cpu --repeats 5 > "$OUT/quant_cpu.json"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
rows = {}
for k in ("triton", "bitsandbytes", "torch"):
    r = json.load(open(f"{out}/quant_cuda_{k}.json"))
    rows[k] = {f"{qt}_{d}": r[qt][f"dequantize_{d}"]["ours_mparams"] for qt in ("nf4", "fp4") for d in ("fp32", "bf16")}
    rows[k]["bnb_nf4_fp32"] = r["nf4"]["dequantize_fp32"]["bnb_mparams"]
    rows[k]["matmul_fused_vs_bnb"] = [c["fused_vs_bnb"] for c in r["matmul"]["cases"]]
best = {key: max(rows, key=lambda k: rows[k][key] or 0) for key in rows["triton"] if not key.startswith(("bnb", "matmul"))}
print(json.dumps({"dequant_mparams_by_choice": rows, "fastest_choice": best}))
PY
run_one() {  # name, then extra arguments for `qlora run`
  name=$1; shift
  python3 -c "from qlora_plugins.cli import main; main()" run examples/quickstart.yaml --set train.device=cuda \
    --set train.max_steps=40 "$@" -o "$OUT/run-$name" --force --no-progress --json > "$OUT/run-$name.json" \
    && python3 - "$OUT/run-$name.json" "$name" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(json.dumps({"run": sys.argv[2], "quantizer": r["plugins"]["quantizer"]["name"], "backend": r["quantization"].get("backend"),
                  "median_step_time_s": r["training"]["median_step_time_s"], "last_loss": r["training"]["last_loss"],
                  "cuda_peak_allocated_bytes": r["memory"].get("cuda_peak_allocated_bytes")}))
PY
}
for k in triton bitsandbytes torch; do QLORA_PLUGINS_CUDA_KERNELS=$k run_one "nf4-native-$k"; done
run_one nf4-bitsandbytes-backend --set quantizer.backend=bitsandbytes   # transformers + bitsandbytes Linear4bit + peft
run_one lora-baseline --set quantizer=none
# 5. the NCCL path: DDP and FSDP through `qlora run --nproc-per-node N` (N = the GPUs, at most 2; one GPU
#    still runs one nccl rank), each run's backend, world size and per-rank CUDA peak printed
NGPU=$(python3 -c "import torch; print(min(2, torch.cuda.device_count()))")
for strategy in ddp fsdp; do
  python3 -m qlora_plugins run examples/quickstart.yaml --set train.device=cuda --set train.max_steps=10 \
    --set train.batch_size=$((2 * NGPU)) --set train.distributed=$strategy --nproc-per-node "$NGPU" \
    -o "$OUT/run-nccl-$strategy" --force --no-progress > "$OUT/run-nccl-$strategy.log" 2>&1
  echo "nccl $strategy exit $?"
  python3 - "$OUT/run-nccl-$strategy/report.json" <<'PY' || tail -5 "$OUT/run-nccl-$strategy.log"
import json, sys
r = json.load(open(sys.argv[1]))
d = r["distributed"]
print(json.dumps({"strategy": d["strategy"], "backend": d["backend"], "world_size": d["world_size"],
                  "median_step_time_s": r["training"]["median_step_time_s"], "last_loss": r["training"]["last_loss"],
                  "ranks": d["ranks"]}))
PY
done
