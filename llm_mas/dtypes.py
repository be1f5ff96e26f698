"""The one table of weight dtypes a config may name, and its parser.

    parse_dtype("bfloat16")  # torch.bfloat16
    parse_dtype("auto")      # "auto": the checkpoint's own dtype (what transformers' from_pretrained takes)

Imports no torch at module level, so configs can validate dtype names without loading torch.
"""

from __future__ import annotations

from .errors import choice_error

# Concrete weight dtypes (names of torch dtypes), then "auto" (keep whatever the checkpoint stores).
WEIGHT_DTYPES = ("float32", "bfloat16", "float16")
DTYPES = (*WEIGHT_DTYPES, "auto")


def parse_dtype(dtype: str, *, allow_auto: bool = True):
    """``"float32" | "bfloat16" | "float16" | "auto"`` -> torch dtype (or the string ``"auto"``).

    ``allow_auto=False`` accepts only the concrete ``WEIGHT_DTYPES``. An unknown name raises ConfigError
    listing the valid ones.
    """
    valid = DTYPES if allow_auto else WEIGHT_DTYPES
    if dtype not in valid:
        raise choice_error("dtype", dtype, valid)
    if dtype == "auto":
        return "auto"
    import torch

    return getattr(torch, dtype)
