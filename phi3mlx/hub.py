"""Resolve a local folder or a Hugging Face Hub id to a local folder (downloading with progress)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .errors import Phi3MLXError
from .tiny import EMBEDDED_ID, TINY_ID, embedded_path, tiny_path

ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.model",
    "*.tiktoken",
    "*.jinja",
    "*.txt",
    "*.py",
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def looks_like_hub_id(s: str) -> bool:
    return bool(_HUB_ID.match(s)) and not s.startswith((".", "/"))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def resolve(path_or_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder as is; a hub id downloaded to the Hugging Face cache (resumable)."""
    s = str(path_or_id)
    p = Path(s).expanduser()
    if p.exists():
        return p
    if s == TINY_ID:
        return tiny_path()
    if s == EMBEDDED_ID:
        return embedded_path()
    if not looks_like_hub_id(s):
        raise Phi3MLXError(f"model path not found: {s}")
    try:
        # huggingface-hub shows a tqdm progress bar per file and resumes partial downloads.
        return Path(snapshot_download(s, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except GatedRepoError:  # a subclass of RepositoryNotFoundError: test it first
        raise Phi3MLXError(
            f"'{s}' is a gated model: accept its license on huggingface.co and log in (hf auth login), "
            "or pass a local folder"
        ) from None
    except RevisionNotFoundError:
        raise Phi3MLXError(f"'{s}' has no revision '{revision}' on the Hugging Face Hub") from None
    except RepositoryNotFoundError:
        raise Phi3MLXError(
            f"'{s}' is neither a local folder nor a model on the Hugging Face Hub (private models need a login)"
        ) from None
    except LocalEntryNotFoundError:
        why = ("offline mode is on (HF_HUB_OFFLINE is set)" if _offline()
               else "the Hugging Face Hub is unreachable (offline?)")
        raise Phi3MLXError(
            f"'{s}' is not a local folder and cannot be downloaded: {why} and it is not in the local cache; "
            "pass a local folder instead"
        ) from None
    except Exception as e:  # connection errors come in many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Phi3MLXError(
            f"cannot download '{s}' from the Hugging Face Hub ({first}); if you are offline, pass a local folder"
        ) from None
