"""Benchmark: qlora_plugins 4-bit kernels vs bitsandbytes, printed as ONE JSON object.

For a ``rows x cols`` fp32 weight (default 4096x4096, blocksize 64) it measures, in
the same process and interleaved (ours, bnb, ours, bnb, ...), the median of
``--repeats`` timed runs after ``--warmup`` untimed ones:

* quantize and dequantize (fp32 and bf16 out) throughput in Mparam/s for nf4 and
  fp4 (ours and bnb, ratio ours/bnb), and for our int4_sym / int4_asym;
* our dequantize into a preallocated ``out=`` buffer (no page faults);
* the bandwidth of a plain ``dst.copy_(src)`` of the output size (timed in the same
  interleaved loop), the dequant bound ``copy_GBps / (0.5 + out_bytes)`` in
  Mparam/s, and our % of it;
* a bit-exactness check: mismatching 4-bit codes / absmax / dequantized values /
  nested (double-quant) state against bnb;
* ``matmul``: a linear layer's two products with an nf4 weight (blocksize 64, double-quantized
  scales decoded first, as QuantLinear does), for ``--matmul-shapes`` (default 4096x4096 and
  11008x4096) and ``--matmul-batches`` rows of input (default 1, 16, 512), interleaved: our fused
  tile kernel (``kernels.matmul_4bit_lut``), dequantize-then-matmul (our dequantization into a
  reused buffer, then torch's matmul: QuantLinear's ``whole`` path), bitsandbytes'
  ``matmul_4bit`` on the same weight, and the fp32 dense matmul; milliseconds (median) and the
  ratios to dequantize-then-matmul and to the dense matmul; for ``x @ W.T`` (forward) and
  ``g @ W`` (input gradient; bitsandbytes has no separate call for it).

Usage: ``python benchmarks/quant.py [--device cpu|cuda] [--rows R --cols C] [--matmul-only | --no-matmul]``.
Exits 2 with an error JSON when ``--device cuda`` is asked without CUDA.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from typing import Callable, Optional

import torch

import qlora_plugins.core.kernels as K

OUT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench(fns: list[Optional[Callable[[], object]]], device: str, warmup: int, repeats: int) -> list[Optional[float]]:
    """Interleaved timing (A B C A B C ...); returns the median seconds of each callable."""
    for _ in range(warmup):
        for f in fns:
            if f is not None:
                f()
                _sync(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, f in enumerate(fns):
            if f is None:
                continue
            _sync(device)
            t0 = time.perf_counter()
            f()
            _sync(device)
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) if t else None for t in times]


def mparams(n: int, sec: Optional[float]) -> Optional[float]:
    return None if sec is None else round(n / sec / 1e6, 1)


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None or b == 0 else round(a / b, 2)


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1).contiguous()
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def mismatches(a: torch.Tensor, b: torch.Tensor) -> int:
    a, b = bits(a.cpu()), bits(b.cpu())
    if a.shape != b.shape:
        return max(a.numel(), b.numel())
    return int((a != b).sum())


def matmul_section(args: argparse.Namespace, dev: str, F) -> dict:
    """Fused tile matmul vs dequantize-then-matmul vs bitsandbytes' matmul_4bit vs dense fp32."""
    bnb_matmul = None
    if F is not None:
        import bitsandbytes

        bnb_matmul = bitsandbytes.matmul_4bit
    code, bs = K.nf4_code(dev), 64
    out: dict = {
        "format": "nf4, blocksize 64, double-quantized scales (decoded once per product, as QuantLinear does)",
        "fused_available": K.fused_matmul_available(dev) if dev == "cpu" else K.cuda_backend(),
        "tile_bytes": K.TILE_BYTES,
        "statistic": f"median ms of {args.repeats} after {args.warmup} warm-up, interleaved",
        "cases": [],
    }
    gen = torch.Generator().manual_seed(args.seed)
    for shape in args.matmul_shapes.split(","):
        rows, cols = (int(v) for v in shape.lower().split("x"))
        w = (torch.randn(rows, cols, generator=gen) * 0.02).to(dev)
        packed, absmax = K.quantize_4bit_lut(w, code, bs)
        codes, absmax2, offset, code256 = K.double_quantize(absmax)
        dense = K.dequantize_4bit_lut(packed, K.double_dequantize(codes, absmax2, offset, code256), code, bs, (rows, cols))
        buf = torch.empty(rows * cols, dtype=torch.float32, device=dev)
        if F is not None:
            p_bnb, st = F.quantize_4bit(w, blocksize=bs, quant_type="nf4", compress_statistics=True)
            st.dtype = torch.float32

        def scales():
            return K.double_dequantize(codes, absmax2, offset, code256)

        for m in (int(v) for v in args.matmul_batches.split(",")):
            x = torch.randn(m, cols, generator=gen).to(dev)
            g = torch.randn(m, rows, generator=gen).to(dev)
            fns = {
                "fused": lambda: K.matmul_4bit_lut(x, packed, scales(), code, bs, (rows, cols)),
                "dequant_then_matmul": lambda: x @ K.dequantize_4bit_lut(packed, scales(), code, bs, (rows, cols), out=buf).t(),
                "bnb_matmul_4bit": (lambda: bnb_matmul(x, p_bnb.t(), quant_state=st)) if bnb_matmul else None,
                "dense_fp32": lambda: x @ dense.t(),
                "grad_fused": lambda: K.matmul_4bit_lut(g, packed, scales(), code, bs, (rows, cols), transpose=False),
                "grad_dequant_then_matmul": lambda: g @ K.dequantize_4bit_lut(packed, scales(), code, bs, (rows, cols), out=buf),
                "grad_dense_fp32": lambda: g @ dense,
            }
            err = (fns["fused"]() - x @ dense.t()).abs().max().item()
            gerr = (fns["grad_fused"]() - g @ dense).abs().max().item()
            times = dict(zip(fns, bench(list(fns.values()), dev, args.warmup, args.repeats)))
            ms = {k: (None if v is None else round(v * 1e3, 2)) for k, v in times.items()}
            out["cases"].append(
                {
                    "shape": [rows, cols],
                    "batch": m,
                    "ms": ms,
                    "fused_vs_dequant_then_matmul": ratio(times["fused"], times["dequant_then_matmul"]),
                    "fused_vs_bnb": ratio(times["fused"], times["bnb_matmul_4bit"]),
                    "fused_vs_dense": ratio(times["fused"], times["dense_fp32"]),
                    "bnb_vs_dense": ratio(times["bnb_matmul_4bit"], times["dense_fp32"]),
                    "grad_fused_vs_dequant_then_matmul": ratio(times["grad_fused"], times["grad_dequant_then_matmul"]),
                    "grad_fused_vs_dense": ratio(times["grad_fused"], times["grad_dense_fp32"]),
                    "max_abs_diff_vs_dense": {"forward": err, "grad": gerr},
                }
            )
            print(json.dumps(out["cases"][-1]), file=sys.stderr, flush=True)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--matmul-shapes", default="4096x4096,11008x4096", help="comma-separated ROWSxCOLS (out x in)")
    ap.add_argument("--matmul-batches", default="1,16,512", help="comma-separated rows of input")
    ap.add_argument("--matmul-only", action="store_true", help="only the matmul section")
    ap.add_argument("--no-matmul", action="store_true", help="skip the matmul section")
    args = ap.parse_args(argv)
    dev, bs = args.device, args.blocksize

    if dev == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "--device cuda requested but CUDA is not available", "device": dev}))
        return 2

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes
        import bitsandbytes.functional as F

        bnb_version: Optional[str] = bitsandbytes.__version__
    except Exception as exc:  # noqa: BLE001
        F, bnb_version = None, f"unavailable: {exc}"

    n = args.rows * args.cols
    x = (torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(args.seed)) * 0.02).to(dev)
    res: dict = {
        "device": dev,
        "device_name": torch.cuda.get_device_name() if dev == "cuda" else None,
        "shape": [args.rows, args.cols],
        "numel": n,
        "blocksize": bs,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "statistic": "median, interleaved ours/bnb",
        "torch_num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "bitsandbytes_version": bnb_version,
        "backend": K.backend_name() if dev == "cpu" else f"CUDA kernels: {K.cuda_backend()} (QLORA_PLUGINS_CUDA_KERNELS)",
    }
    W, R = args.warmup, args.repeats
    if not args.no_matmul:
        res["matmul"] = matmul_section(args, dev, F)
    if args.matmul_only:
        print(json.dumps(res, indent=1))
        return 0

    # ---- copy bandwidth references (filled in the dequant loops) ----
    copy_src = {k: torch.ones(n, dtype=dt, device=dev) for k, dt in OUT_DTYPES.items()}
    copy_dst = {k: torch.empty(n, dtype=dt, device=dev) for k, dt in OUT_DTYPES.items()}
    copy_times: dict[str, list[float]] = {k: [] for k in OUT_DTYPES}
    bound_pct: dict[str, dict[str, float]] = {}

    def dequant_block(name: str, ours_dq: Callable, bnb_dq: Optional[Callable]) -> dict:
        out: dict = {}
        for key, dt in OUT_DTYPES.items():
            buf = torch.empty(n, dtype=dt, device=dev)
            t_ours, t_bnb, t_pre, t_copy = bench(
                [
                    lambda: ours_dq(dt, None),
                    (lambda: bnb_dq(dt)) if bnb_dq is not None else None,
                    lambda: ours_dq(dt, buf),
                    lambda: copy_dst[key].copy_(copy_src[key]),
                ],
                dev, W, R,
            )  # fmt: skip
            copy_times[key].append(t_copy)
            out_bytes = torch.empty((), dtype=dt).element_size()
            gbps = 2 * n * out_bytes / t_copy / 1e9
            bound = gbps * 1e9 / (0.5 + out_bytes) / 1e6
            o, b, p = mparams(n, t_ours), mparams(n, t_bnb), mparams(n, t_pre)
            out[f"dequantize_{key}"] = {
                "ours_mparams": o,
                "bnb_mparams": b,
                "ratio": ratio(o, b),
                "ours_prealloc_out_mparams": p,
                "copy_GBps_same_loop": round(gbps, 2),
                "bound_mparams": round(bound, 1),
                "ours_pct_of_bound": round(100 * o / bound, 1),
                "ours_prealloc_pct_of_bound": round(100 * p / bound, 1),
            }
            bound_pct.setdefault(name, {})[key] = round(100 * o / bound, 1)
        return out

    exact: dict = {}
    for qt in ("nf4", "fp4"):
        code = K.nf4_code() if qt == "nf4" else K.fp4_code()
        sec: dict = {}
        bnb_q = (lambda: F.quantize_4bit(x, blocksize=bs, quant_type=qt)) if F else None
        t_ours, t_bnb = bench([lambda: K.quantize_4bit_lut(x, code, bs), bnb_q], dev, W, R)
        o, b = mparams(n, t_ours), mparams(n, t_bnb)
        sec["quantize"] = {"ours_mparams": o, "bnb_mparams": b, "ratio": ratio(o, b)}

        packed, absmax = K.quantize_4bit_lut(x, code, bs)
        if F:
            p_ref, st = F.quantize_4bit(x, blocksize=bs, quant_type=qt)
            states = {}
            for key, dt in OUT_DTYPES.items():
                states[key] = copy.copy(st)
                states[key].dtype = dt
            bnb_dq = lambda dt: F.dequantize_4bit(p_ref, states["fp32" if dt == torch.float32 else "bf16"])  # noqa: E731
        else:
            bnb_dq = None
        sec.update(dequant_block(qt, lambda dt, o=None: K.dequantize_4bit_lut(packed, absmax, code, bs, x.shape, dt, out=o), bnb_dq))
        res[qt] = sec

        if F:
            pr = p_ref.reshape(-1)
            e = {
                "codes_compared": n,
                "code_mismatches": int(((packed >> 4) != (pr >> 4)).sum() + ((packed & 15) != (pr & 15)).sum()),
                "absmax_mismatches": mismatches(absmax, st.absmax),
            }
            for key in OUT_DTYPES:
                e[f"dequant_{key}_mismatches"] = mismatches(
                    K.dequantize_4bit_lut(packed, absmax, code, bs, x.shape, OUT_DTYPES[key]),
                    F.dequantize_4bit(p_ref, states[key]),
                )
            # nested (compress_statistics=True) state
            p2, st2 = F.quantize_4bit(x, blocksize=bs, quant_type=qt, compress_statistics=True)
            codes, absmax2, offset, code256 = K.double_quantize(absmax)
            e["nested_state_mismatches"] = (
                mismatches(codes, st2.absmax)
                + mismatches(absmax2, st2.state2.absmax)
                + mismatches(torch.tensor(offset, dtype=torch.float32), st2.offset)
                + mismatches(code256, st2.state2.code)
            )
            st2.dtype = torch.float32
            am = K.double_dequantize(codes, absmax2, offset, code256)
            e["nested_dequant_fp32_mismatches"] = mismatches(
                K.dequantize_4bit_lut(packed, am, code, bs, x.shape, torch.float32), F.dequantize_4bit(p2, st2)
            )
            exact[qt] = e

    for name, sym in (("int4_sym", True), ("int4_asym", False)):
        (t_ours,) = bench([lambda: K.quantize_4bit_int(x, bs, sym)], dev, W, R)
        sec = {"quantize": {"ours_mparams": mparams(n, t_ours), "bnb_mparams": None, "ratio": None}}
        packed, scale, offset = K.quantize_4bit_int(x, bs, sym)
        sec.update(
            dequant_block(
                name,
                lambda dt, o=None: K.dequantize_4bit_lut(packed, scale, K.int4_code(sym, x.device), bs, x.shape, dt, offset=offset, out=o),
                None,
            )
        )
        res[name] = sec

    # double quantization of the statistics alone
    _, absmax = K.quantize_4bit_lut(x, K.nf4_code(), bs)
    if F:
        t_ours, t_bnb = bench(
            [lambda: K.double_quantize(absmax), lambda: F.quantize_blockwise(absmax - absmax.mean(), blocksize=256)],
            dev, W, R,
        )  # fmt: skip
    else:
        (t_ours,), t_bnb = bench([lambda: K.double_quantize(absmax)], dev, W, R), None
    res["double_quantize_absmax"] = {
        "numel": absmax.numel(),
        "ours_ms": round(t_ours * 1e3, 3),
        "bnb_ms": None if t_bnb is None else round(t_bnb * 1e3, 3),
    }

    res["copy"] = {
        key: {
            "bytes_per_param_out": torch.empty((), dtype=dt).element_size(),
            "copy_GBps_median": round(2 * n * torch.empty((), dtype=dt).element_size() / statistics.median(copy_times[key]) / 1e9, 2),
        }
        for key, dt in OUT_DTYPES.items()
    }
    for key, dt in OUT_DTYPES.items():
        ob = torch.empty((), dtype=dt).element_size()
        res["copy"][key]["dequant_bound_mparams"] = round(res["copy"][key]["copy_GBps_median"] * 1e3 / (0.5 + ob), 1)
    res["dequant_pct_of_bound"] = bound_pct
    res["bit_exact_vs_bnb"] = exact if F else None
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
