"""Materializing named models (``model.source``) into a per-user cache."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from qlora_plugins.core.errors import WriteError

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
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    except OSError as exc:
        raise WriteError(f"{config_path}: cannot create the model cache {final.parent} ({ENV_HOME}): {exc.strerror or exc}") from None
    try:
        cls().materialize(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first, or an incomplete entry is in the way
            shutil.rmtree(tmp, ignore_errors=True)
            if not (final / "config.json").is_file():
                raise WriteError(f"{config_path}: {final} is in the way of the model cache and holds no model; remove it") from None
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(f"{config_path}: cannot write the model cache {final}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
