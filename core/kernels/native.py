"""Build-on-first-use loader for the C kernels in ``blockwise.c``.

The source is compiled with the system C compiler into a per-user cache
(``$QLORA_PLUGINS_CACHE`` or ``~/.cache/qlora-plugins/kernels``), keyed by a hash
of the source, the compiler and the flags; the shared object is written under a
temporary name and renamed atomically, so concurrent processes are safe. It is
loaded with :mod:`ctypes`; tensors are passed by ``data_ptr()``.

If no compiler is found or the build fails, :func:`get_lib` returns ``None``
(one ``logging`` debug line) and callers use the pure-torch reference.
``QLORA_PLUGINS_NO_NATIVE=1`` forces that fallback.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

_SRC = Path(__file__).with_name("blockwise.c")
_ABI_VERSION = 4
_BASE_FLAGS = ["-O3", "-std=gnu11", "-fopenmp", "-fPIC", "-shared", "-ffp-contract=off", "-fno-strict-aliasing"]

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_tried = False

c_i64 = ctypes.c_int64
c_int = ctypes.c_int
c_vp = ctypes.c_void_p


def native_disabled() -> bool:
    """True when ``QLORA_PLUGINS_NO_NATIVE`` is set to a true value."""
    return os.environ.get("QLORA_PLUGINS_NO_NATIVE", "").strip().lower() not in ("", "0", "false", "no")


def cache_dir() -> Path:
    """Directory holding compiled kernels."""
    env = os.environ.get("QLORA_PLUGINS_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "qlora-plugins" / "kernels"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def simd_flags() -> list[str]:
    """``-mavx2 -mfma -mf16c`` if this CPU supports all three (x86 Linux), else nothing."""
    flags = _cpu_flags()
    if {"avx2", "fma", "f16c"} <= flags:
        return ["-mavx2", "-mfma", "-mf16c"]
    return []


def find_compiler() -> Optional[str]:
    """Path of the C compiler to use: ``$CC``, ``cc``, ``gcc`` or ``clang``."""
    candidates = []
    if os.environ.get("CC"):
        candidates.append(os.environ["CC"])
    candidates += ["cc", "gcc", "clang"]
    for c in candidates:
        path = shutil.which(c)
        if path:
            return path
    return None


def _build(cc: str, flags: list[str], src: bytes, out_dir: Path) -> Path:
    key = hashlib.sha256(b"\0".join([src, cc.encode(), " ".join(flags).encode(), str(_ABI_VERSION).encode()]))
    out = out_dir / f"blockwise-{key.hexdigest()[:20]}.so"
    if out.exists():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".blockwise-", suffix=".so.tmp", dir=out_dir)
    os.close(fd)
    try:
        cmd = [cc, *flags, str(_SRC), "-o", tmp, "-lm"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)  # atomic: concurrent builders just overwrite an identical file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _declare(lib: ctypes.CDLL) -> None:
    lib.qp_abi_version.restype = c_int
    lib.qp_has_simd.restype = c_int
    lib.qp_quantize_4bit_lut.restype = c_int
    lib.qp_quantize_4bit_lut.argtypes = [c_vp, c_int, c_i64, c_i64, c_vp, c_vp, c_vp, c_vp, c_int]
    lib.qp_quantize_4bit_int.restype = c_int
    lib.qp_quantize_4bit_int.argtypes = [c_vp, c_int, c_i64, c_i64, c_int, c_vp, c_vp, c_vp, c_int]
    lib.qp_dequantize_4bit_lut.restype = c_int
    lib.qp_dequantize_4bit_lut.argtypes = [c_vp, c_vp, c_vp, c_vp, c_i64, c_i64, c_vp, c_int, c_int]
    lib.qp_quantize_8bit.restype = c_int
    lib.qp_quantize_8bit.argtypes = [c_vp, c_i64, c_i64, c_vp, c_vp, c_vp, c_int]
    lib.qp_dequantize_8bit.restype = c_int
    lib.qp_dequantize_8bit.argtypes = [c_vp, c_vp, c_vp, c_i64, c_i64, c_vp, c_int, c_int]
    lib.qp_matmul_4bit_lut_xwt.restype = c_int
    lib.qp_matmul_4bit_lut_xwt.argtypes = [c_vp, c_i64, c_i64, c_i64, c_vp, c_vp, c_vp, c_vp, c_i64, c_vp, c_i64, c_i64, c_vp, c_int]
    lib.qp_matmul_4bit_lut_gw.restype = c_int
    lib.qp_matmul_4bit_lut_gw.argtypes = [c_vp, c_i64, c_i64, c_i64, c_i64, c_vp, c_vp, c_vp, c_vp, c_i64, c_vp, c_i64, c_vp, c_int]


def _load() -> Optional[ctypes.CDLL]:
    if native_disabled():
        logger.debug("qlora_plugins kernels: QLORA_PLUGINS_NO_NATIVE set, using the torch reference")
        return None
    errors: list[str] = []
    cc = find_compiler()
    if cc is None:
        errors.append("no C compiler (cc/gcc/clang) found")
    else:
        src = _SRC.read_bytes()
        simd = simd_flags()
        no_omp = [f for f in _BASE_FLAGS if f != "-fopenmp"]
        # fallbacks: a compiler without OpenMP runs single-threaded; an unwritable cache
        # directory is replaced by a per-user temporary one
        variants = [_BASE_FLAGS + simd, no_omp + simd] + ([_BASE_FLAGS, no_omp] if simd else [])
        dirs = [cache_dir(), Path(tempfile.gettempdir()) / f"qlora-plugins-{getattr(os, 'getuid', lambda: 'user')()}" / "kernels"]
        for out_dir in dirs:
            for flags in variants:
                try:
                    path = _build(cc, flags, src, out_dir)
                    lib = ctypes.CDLL(str(path))
                    _declare(lib)
                    if lib.qp_abi_version() != _ABI_VERSION:
                        raise RuntimeError("stale kernel library (ABI mismatch)")
                    return lib
                except OSError as exc:  # includes an unwritable cache directory
                    errors.append(f"{out_dir}: {exc}")
                    if not out_dir.is_dir() or not os.access(out_dir, os.W_OK):
                        break
                except Exception as exc:  # noqa: BLE001 - any failure means: try the next variant
                    errors.append(str(exc))
    logger.debug("qlora_plugins kernels: native build unavailable (%s), using the torch reference", "; ".join(errors)[-4000:])
    return None


def get_lib() -> Optional[ctypes.CDLL]:
    """The loaded kernel library, building it on first call; ``None`` means use the torch path.

    ``QLORA_PLUGINS_NO_NATIVE`` is checked on every call (so it can be toggled at runtime).
    """
    global _lib, _tried
    if native_disabled():
        return None
    if not _tried:
        with _lock:
            if not _tried:
                _lib = _load()
                _tried = True
    return _lib


_blas: Optional[tuple] = None
_blas_tried = False


def _loaded_libraries() -> list[str]:
    """Shared libraries mapped into this process (Linux), BLAS-looking ones first."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            paths = {line.split()[-1] for line in f if ".so" in line and "/" in line}
    except OSError:
        return []
    keys = ("torch_cpu", "mkl", "openblas", "blas")
    return sorted(
        (p for p in paths if any(k in os.path.basename(p) for k in keys)),
        key=lambda p: [k in os.path.basename(p) for k in keys].index(True),
    )


def _find_blas() -> Optional[tuple]:
    import torch  # noqa: F401 - torch's own BLAS must be loaded before we look for it

    for path in _loaded_libraries():
        try:
            blas = ctypes.CDLL(path)
            sgemm = ctypes.cast(blas.sgemm_, c_vp).value
        except (OSError, AttributeError):
            continue
        return sgemm, path
    return None


def blas() -> Optional[tuple]:
    """``(address of sgemm_, library path)`` of the BLAS torch uses (Fortran interface, 32-bit ints), for the
    fused tile kernels; ``None`` when it cannot be found or fails a self-check (the callers then
    dequantize the whole weight and use torch's matmul)."""
    global _blas, _blas_tried
    if get_lib() is None:
        return None
    if _blas_tried:
        return _blas
    with _lock:
        if not _blas_tried:
            found = None
            try:
                found = _find_blas()
                if found is not None and not _blas_self_check(found):
                    logger.debug("qlora_plugins kernels: %s's sgemm_ failed the self-check", found[2])
                    found = None
            except Exception as exc:  # noqa: BLE001 - any failure: no fused path
                logger.debug("qlora_plugins kernels: no BLAS for fused tiles (%s)", exc)
                found = None
            _blas, _blas_tried = found, True
    return _blas


def _blas_self_check(found: tuple) -> bool:
    """Multiply a small weight through the fused kernel and compare with torch (catches a BLAS
    with another integer width or calling convention)."""
    import torch

    lib = get_lib()
    if lib is None:
        return False
    rows, cols, m, bs = 6, 64, 3, 32
    codes = torch.arange(rows * cols // 2, dtype=torch.int64).remainder(256).to(torch.uint8)
    absmax = torch.linspace(0.5, 2.0, rows * cols // bs, dtype=torch.float32)
    code = torch.linspace(-1.0, 1.0, 16, dtype=torch.float32)
    x = torch.linspace(-1.0, 1.0, m * cols, dtype=torch.float32).reshape(m, cols)
    w = torch.empty(rows * cols, dtype=torch.float32)
    lib.qp_dequantize_4bit_lut(codes.data_ptr(), absmax.data_ptr(), None, code.data_ptr(), rows * cols, bs, w.data_ptr(), 0, 1)
    y = torch.empty(m, rows, dtype=torch.float32)
    rc = lib.qp_matmul_4bit_lut_xwt(
        x.data_ptr(), m, cols, rows, codes.data_ptr(), absmax.data_ptr(), None, code.data_ptr(), bs, y.data_ptr(), rows, 2, found[0], 1
    )
    return rc == 0 and torch.allclose(y, x @ w.view(rows, cols).t(), rtol=1e-5, atol=1e-5)


def backend_name() -> str:
    """``"native"`` if the C kernels are in use for CPU tensors, else ``"torch"``."""
    return "native" if get_lib() is not None else "torch"


def _reset_for_tests() -> None:
    """Forget the loaded library so the next call re-resolves (tests only)."""
    global _lib, _tried, _blas, _blas_tried
    with _lock:
        _lib, _tried = None, False
        _blas, _blas_tried = None, False
