"""A run's place on disk: its writers start a fresh run (moving an earlier one aside) or continue one.

:func:`open_writers` is how :class:`~delve.SaturationTracker` builds its
writers: with ``initial_epoch=0`` the files an earlier run left in the same
place (each writer lists them, :meth:`AbstractWriter.previous_outputs`) move
to ``savefile + '.previous'``, so no stale file passes for one of the new run;
with ``initial_epoch=E`` every writer keeps what was written before ``E``.
"""
from __future__ import annotations

import os
import shutil
import warnings
from typing import Any, Mapping, Optional, Sequence

from delve.writers import SaveTo, build_writer
from delve.writers.base import AbstractWriter


def move_previous_run(savefile: str, paths: Sequence[str]) -> Optional[str]:
    """Move an earlier run's output files to ``savefile + '.previous'``, keeping their layout; warn once.

    Parameters
    ----------
    savefile : str
        The run's path (the tracker's ``savefile``).
    paths : list of str
        Files of the earlier run; an older backup in ``savefile + '.previous'``
        is replaced.

    Returns
    -------
    str or None
        The backup folder, ``None`` when there was nothing to move.
    """
    if not paths:
        return None
    base = os.path.dirname(os.path.abspath(savefile))
    backup = os.path.abspath(savefile) + ".previous"
    if os.path.isdir(backup):
        shutil.rmtree(backup)
    for path in paths:
        target = os.path.join(backup, os.path.relpath(os.path.abspath(path), base))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(path, target)
    warnings.warn(
        f"delve starts a fresh run in {savefile!r}, which held {len(paths)} output file(s) of an earlier run; "
        f"they were moved to {backup!r} (replacing an older backup). Pass initial_epoch=E to continue a run "
        "instead.",
        stacklevel=5,
    )
    return backup


def open_writers(
    save_to: SaveTo, writer_args: Optional[Mapping[str, Any]], savefile: str, initial_epoch: int, nosave: bool
) -> AbstractWriter:
    """The writers of a run, its folder created, an earlier run moved aside or continued.

    Parameters
    ----------
    save_to : str, AbstractWriter or list of them
        As for :class:`~delve.SaturationTracker`.
    writer_args : dict, optional
        Keyword arguments of the writers (``savepath`` defaults to ``savefile``).
    savefile : str
        The run's path.
    initial_epoch : int
        0 starts a fresh run; ``E > 0`` continues the run at epoch ``E``.
    nosave : bool
        Build the writers but touch no file.

    Returns
    -------
    AbstractWriter
    """
    arguments = dict(writer_args or {})
    arguments.setdefault("savepath", savefile)
    writer = build_writer(save_to, arguments)
    if nosave:
        return writer
    os.makedirs(os.path.abspath(savefile), exist_ok=True)
    if initial_epoch == 0:
        move_previous_run(savefile, writer.previous_outputs())
    else:
        writer.resume_from_saved_state(initial_epoch)
    return writer
