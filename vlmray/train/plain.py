"""What a checkpoint's ``state.pt`` may hold: tensors and plain Python types only, the objects
``torch.load(weights_only=True)`` reads without running code (``vlmray.train.checkpoint``).

:func:`plain_state` converts what would not load so (numpy arrays and scalars, dataclasses)
and refuses anything else. :func:`pack_numpy` / :func:`unpack_numpy` carry numpy arrays through
a checkpoint as numpy arrays (not tensors) for state that is numpy on both sides (the ``extra``
of ``save_checkpoint``).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

NDARRAY = "__ndarray__"
"""The key of the one-key dict :func:`pack_numpy` puts in place of a numpy array."""


def plain_state(obj: Any, where: str = "state") -> Any:
    """``obj`` as only tensors and plain types, which ``torch.load(weights_only=True)`` reads:
    numpy arrays become tensors, numpy scalars Python numbers, dataclasses dicts, frozensets
    sets, other dict/tuple subclasses plain dicts/tuples; anything else raises ``TypeError``
    naming where it sits. Containers that need no change are returned as they are (a module's
    ``state_dict`` keeps its ``_metadata``)."""
    if obj is None or isinstance(obj, torch.Tensor) or type(obj) in _PLAIN_SCALARS:
        return obj
    if isinstance(obj, np.ndarray):
        try:
            return torch.from_numpy(np.array(obj, dtype=obj.dtype.newbyteorder("=")))
        except TypeError as e:               # object, string, datetime arrays
            raise TypeError(f"checkpoint {where}: a numpy array of {obj.dtype} has no tensor "
                            f"type ({e}); convert it to numbers") from None
    if isinstance(obj, np.generic):
        return obj.item()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return plain_state(asdict(obj), where)
    if isinstance(obj, dict):
        items = [(plain_state(k, f"{where} key {k!r}"), plain_state(v, f"{where}[{k!r}]"))
                 for k, v in obj.items()]
        if type(obj) in (dict, OrderedDict) and all(
                a is k and b is v for (a, b), (k, v) in zip(items, obj.items())):
            return obj
        out = (OrderedDict if isinstance(obj, OrderedDict) else dict)(items)
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata          # type: ignore[attr-defined]
        return out
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [plain_state(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        kind = type(obj) if type(obj) in (list, tuple, set) else (
            set if isinstance(obj, (set, frozenset)) else tuple)
        if kind is type(obj) and all(a is b for a, b in zip(items, obj)):
            return obj
        return kind(items)
    raise TypeError(f"checkpoint {where}: {type(obj).__module__}.{type(obj).__qualname__} is "
                    f"not a tensor or a plain type; convert it in the state_dict that returns "
                    f"it (checkpoints hold only tensors and plain types, so loading them can "
                    f"never run code)")


_PLAIN_SCALARS = (bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


def pack_numpy(obj: Any) -> Any:
    """``obj`` with every numpy array inside dicts, lists and tuples replaced by
    ``{NDARRAY: array}`` (which :func:`plain_state` then makes a tensor), so that
    :func:`unpack_numpy` gives it back as a numpy array; everything else is left as it is."""
    if isinstance(obj, np.ndarray):
        return {NDARRAY: obj}
    if isinstance(obj, dict):
        return {k: pack_numpy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return (list if isinstance(obj, list) else tuple)(pack_numpy(v) for v in obj)
    return obj


def unpack_numpy(obj: Any) -> Any:
    """The inverse of :func:`pack_numpy` after a save and load: each ``{NDARRAY: tensor}``
    becomes a numpy array of the saved dtype and shape; tensors saved as tensors stay tensors."""
    if isinstance(obj, dict):
        if len(obj) == 1 and NDARRAY in obj and isinstance(obj[NDARRAY], torch.Tensor):
            return obj[NDARRAY].numpy()
        return {k: unpack_numpy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(unpack_numpy(v) for v in obj)
    return obj


__all__ = ["NDARRAY", "pack_numpy", "plain_state", "unpack_numpy"]
