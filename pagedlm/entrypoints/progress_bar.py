"""The progress bar: tqdm.auto's choice (a widget in a notebook that has ipywidgets, the text bar
elsewhere), without its warning when a notebook lacks ipywidgets."""

import warnings
from typing import Callable

from tqdm import TqdmWarning

with warnings.catch_warnings():
    warnings.simplefilter("ignore", TqdmWarning)
    from tqdm.auto import tqdm

__all__ = ["progress_bar", "tqdm"]


def progress_bar(use_tqdm: bool | Callable[..., tqdm], total: int | None, desc: str) -> tqdm:
    """The bar of an ``LLM`` call's ``use_tqdm``: tqdm's, a disabled one for False, or what a
    callable makes of vLLM's arguments (``total``, ``desc``, ``dynamic_ncols``; no ``disable``,
    which vLLM never passes: a callable written for vLLM's keywords would refuse it)."""
    if not use_tqdm:
        return tqdm(total=total, desc=desc, disable=True)
    make_bar = use_tqdm if callable(use_tqdm) else tqdm
    return make_bar(total=total, desc=desc, dynamic_ncols=True)
