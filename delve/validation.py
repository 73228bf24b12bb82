"""Checks of constructor arguments, shared by the tracker and the callbacks: clear errors, raised early."""
from __future__ import annotations

import numbers
import os
import warnings
from typing import Any, Iterable, List, Mapping, Optional

import torch


def check_integer(parameter: str, value: Any, minimum: int, optional: bool = False) -> Optional[int]:
    """``value`` as an ``int`` if it is an integer (Python or numpy, never ``bool``) of at least ``minimum``.

    Parameters
    ----------
    parameter : str
        Name of the parameter, for the error message.
    value : Any
        The value given.
    minimum : int
        The smallest valid value.
    optional : bool
        Whether ``None`` is valid (and returned as is).

    Returns
    -------
    int or None

    Raises
    ------
    ValueError
        Naming the parameter, the valid values and what was given.

    Examples
    --------
    >>> import numpy as np
    >>> check_integer("log_interval", np.int64(2), 1)
    2
    >>> check_integer("max_samples", 0, 1, optional=True)
    Traceback (most recent call last):
    ...
    ValueError: max_samples must be None or an int >= 1, got 0
    """
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        choices = f"None or an int >= {minimum}" if optional else f"an int >= {minimum}"
        raise ValueError(f"{parameter} must be {choices}, got {value!r}")
    return int(value)


def check_path(parameter: str, value: Any) -> str:
    """``value`` as a str path if it is a non-empty ``str`` or ``os.PathLike``.

    Examples
    --------
    >>> import pathlib
    >>> check_path("savefile", pathlib.Path("runs") / "exp")
    'runs/exp'
    """
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if isinstance(path, str) and path.strip():
            return path
    raise ValueError(f"{parameter} must be a non-empty path (str or os.PathLike) such as 'runs/exp', got {value!r}")


def check_device(device: Any) -> Optional[torch.device]:
    """``device`` as a :class:`torch.device` that can hold statistics, or ``None`` (beside the activations).

    A CUDA device on a machine without CUDA falls back to ``None`` with a
    warning; ``'meta'`` (which holds no data) and anything that is no device are
    refused with a ValueError naming ``device``.

    Examples
    --------
    >>> check_device("cpu"), check_device(None)
    (device(type='cpu'), None)
    """
    if device is None:
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device={device!r} is not a torch device: {error}") from None
    if resolved.type == "meta":
        raise ValueError("device='meta' holds no data; use None (beside the activations), 'cpu' or 'cuda'")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(
            f"device={device!r} but CUDA is not available; delve keeps its statistics on the "
            "device of the activations instead",
            stacklevel=3,
        )
        return None
    return resolved


def check_names(parameter: str, names: Any) -> List[str]:
    """A list of names: a str is one name (not its characters), else an iterable of str.

    Examples
    --------
    >>> check_names("ignore_layer_names", "enc"), check_names("ignore_layer_names", ("a", "b"))
    (['enc'], ['a', 'b'])
    """
    if isinstance(names, str):
        return [names]
    if isinstance(names, Iterable) and not isinstance(names, Mapping):
        listed = list(names)
        if all(isinstance(name, str) for name in listed):
            return listed
    raise ValueError(f"{parameter} must be a layer name or a list of layer names, got {names!r}")

