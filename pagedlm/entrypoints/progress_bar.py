"""The progress bar: tqdm.auto's choice (a widget in a notebook that has ipywidgets, the text bar
elsewhere), without its warning when a notebook lacks ipywidgets."""

import warnings

from tqdm import TqdmWarning

with warnings.catch_warnings():
    warnings.simplefilter("ignore", TqdmWarning)
    from tqdm.auto import tqdm

__all__ = ["tqdm"]
