"""Materializing named models (``model.source``) into a per-user cache."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

ENV_HOME = "QLORA_PLUGINS_HOME"


def cache_home() -> Path:
    """``$QLORA_PLUGINS_HOME`` or ``~/.cache/qlora-plugins``."""
    return Path(os.environ.get(ENV_HOME) or Path.home() / ".cache" / "qlora-plugins")


def materialize_source(registry: Any, name: str, config_path: str = "model.source") -> Path:
    """The checkpoint directory of model source ``name``, created on first use (atomically)."""
    cls = registry.get("model_source", name, config_path)
    final = cache_home() / "models" / f"{cls.name}-v{cls.version}"
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        cls().materialize(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
