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
_ABI_VERSION = 3
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
    logger.debug(
        "qlora_plugins kernels: native build unavailable (%s), using the torch reference", "; ".join(errors)[-4000:]
    )
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


def backend_name() -> str:
    """``"native"`` if the C kernels are in use for CPU tensors, else ``"torch"``."""
    return "native" if get_lib() is not None else "torch"


def _reset_for_tests() -> None:
    """Forget the loaded library so the next call re-resolves (tests only)."""
    global _lib, _tried
    with _lock:
        _lib, _tried = None, False
