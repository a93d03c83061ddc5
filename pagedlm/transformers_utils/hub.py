"""Hugging Face Hub model ids ("org/name") to checkpoint directories, through the local HF cache."""

import os
import re

# What a checkpoint needs; the rest of a repository (other formats, images) is not fetched.
# "*.py": a checkpoint's own config or tokenizer code (its auto_map), which transformers runs only
# with trust_remote_code, and which it must then find in the snapshot.
CHECKPOINT_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja", "*.py"]

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_model_id(model: str) -> bool:
    return bool(_REPO_ID.fullmatch(model))


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def resolve_hub_model(model_id: str, revision: str | None = None, what: str = "model") -> str:
    """The snapshot directory of ``model_id`` in the Hugging Face cache (``HF_HUB_CACHE``, else
    ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``), downloaded there first when it is not
    cached and ``HF_HUB_OFFLINE`` is not set. Errors name the argument as ``what``.

    Raises:
        ValueError: not cached (and offline, or the download failed): the message says where it
            looked.
    """
    from huggingface_hub import constants, snapshot_download

    cache_dir = os.environ.get("HF_HUB_CACHE") or None  # read now: huggingface_hub reads it at import
    where = cache_dir or constants.HF_HUB_CACHE
    try:
        return snapshot_download(model_id, revision=revision, cache_dir=cache_dir, local_files_only=True,
                                 allow_patterns=CHECKPOINT_FILES)
    except Exception as cached_error:  # LocalEntryNotFoundError and friends
        if _env_true("HF_HUB_OFFLINE") or constants.HF_HUB_OFFLINE:
            raise ValueError(f"{what} {model_id!r} is not in the Hugging Face cache at {where} and HF_HUB_OFFLINE is "
                             f"set ({type(cached_error).__name__})") from None
    try:
        return snapshot_download(model_id, revision=revision, cache_dir=cache_dir, allow_patterns=CHECKPOINT_FILES)
    except Exception as exc:
        raise ValueError(f"{what} {model_id!r}: not in the Hugging Face cache at {where}, and downloading it failed "
                         f"({type(exc).__name__}: {exc})") from None
