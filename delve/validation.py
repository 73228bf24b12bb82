"""Checks of constructor arguments, shared by the tracker and the callbacks: clear errors, raised early."""
from __future__ import annotations

import numbers
import os
from typing import Any, Optional


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
