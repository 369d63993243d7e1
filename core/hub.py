"""``model.path`` as a Hugging Face Hub id (``org/name``, with ``model.revision``).

The rule: a ``model.path`` that exists locally (resolved against the config file's directory) is
a local checkpoint directory; one of the form ``org/name`` that does not exist locally is a Hub
id, resolved through ``huggingface_hub``'s cache (``HF_HOME`` / ``HF_HUB_CACHE``) and downloaded
when missing, with only the files a fine-tune reads (config, safetensors weights, tokenizer).
With ``HF_HUB_OFFLINE`` set nothing is downloaded: the cached snapshot is used or the run stops
with one line. The snapshot directory (named by the resolved commit) is then an ordinary
checkpoint directory, and an input of the run (never replaced or written into).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import attrs

from qlora_plugins.core.errors import ConfigError, ModelError

#: ``org/name``: one slash, Hub-legal characters, no leading dot (``./x``, ``../x`` are paths).
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9._-]{1,96}$")
#: What a fine-tune reads from a Hub repository (no .bin, .pth, .gguf, ONNX or other copies).
MODEL_FILES = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
]
CONFIG_FILES = ["config.json"]
_TRUE = {"1", "on", "yes", "true"}


@attrs.define(frozen=True)
class HubModel:
    """A Hub id resolved to its cached snapshot.

    :param repo_id: ``org/name``.
    :param revision: what the config asked for (None: the default branch).
    :param commit: the commit the revision resolved to (the snapshot directory's name).
    :param path: the snapshot directory.
    """

    repo_id: str
    revision: Optional[str]
    commit: str
    path: Path

    def as_dict(self) -> dict:
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit}


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set (read at each call, unlike huggingface_hub's constant)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_cache() -> Path:
    """``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def is_hub_id(value: str, base_dir: Path | None = None) -> bool:
    """Whether ``value`` names a Hub repository: ``org/name`` and nothing of that name exists
    locally (relative to ``base_dir``, or the current directory)."""
    if not isinstance(value, str) or not HUB_ID.match(value) or ".." in value.split("/"):
        return False
    local = Path(value) if base_dir is None else Path(base_dir) / value
    try:
        return not local.exists() and not Path(value).exists()
    except OSError:
        return False


def resolve(repo_id: str, revision: Optional[str] = None, weights: bool = True, config_path: str = "model.path") -> HubModel:
    """The cached snapshot of ``repo_id`` at ``revision``, downloaded first unless offline
    (``weights=False``: the config alone, for ``qlora plan``).

    :raises ModelError: one line: not cached while offline, gated, missing, unreachable.
    """
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:  # pragma: no cover - a dependency of transformers
        raise ModelError(
            f"{config_path}: {repo_id} is a Hugging Face Hub id, which needs huggingface_hub (pip install huggingface_hub)"
        ) from None
    cache = hub_cache()
    where = f"the Hugging Face cache {cache}"
    rev = f" at revision {revision!r}" if revision else ""
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=str(cache),
            local_files_only=offline(),
            allow_patterns=MODEL_FILES if weights else CONFIG_FILES,
        )
    except errors.GatedRepoError:
        raise ModelError(
            f"{config_path}: {repo_id} is gated on the Hugging Face Hub: accept its terms on the model page, then log in "
            "(`hf auth login` or HF_TOKEN)"
        ) from None
    except errors.RevisionNotFoundError:
        raise ConfigError("model.revision", f"{repo_id} has no revision {revision!r} on the Hugging Face Hub") from None
    except errors.RepositoryNotFoundError:
        raise ModelError(
            f"{config_path}: {repo_id} is neither a local directory nor a model on the Hugging Face Hub (or it is private: log in)"
        ) from None
    except errors.LocalEntryNotFoundError:
        if offline():
            raise ModelError(
                f"{config_path}: {repo_id}{rev} is no local directory and is not in {where} while HF_HUB_OFFLINE is set; "
                "download it once online (unset HF_HUB_OFFLINE) or point HF_HOME at a cache that has it"
            ) from None
        raise ModelError(
            f"{config_path}: {repo_id}{rev} is no local directory, the Hugging Face Hub cannot be reached and it is not in {where}"
        ) from None
    except (errors.HfHubHTTPError, OSError, ValueError) as exc:
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{config_path}: cannot get {repo_id}{rev} from the Hugging Face Hub: {text}") from None
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise ModelError(f"{config_path}: {repo_id}{rev} in {where} has no config.json; is it a transformers model?")
    return HubModel(repo_id, revision, path.name, path)


def repo_cache_dir(model: HubModel) -> Path:
    """The cache folder of the whole repository (``models--org--name``, holding blobs, refs
    and every snapshot): no run output may be inside it."""
    return model.path.parent.parent


def check_revision(revision: Optional[str], path: str | None, hub: bool) -> None:
    """``model.revision`` applies to Hub ids only."""
    if revision is not None and not hub:
        raise ConfigError("model.revision", f"applies to a Hugging Face Hub id only; model.path {path!r} is a local directory")
