"""NPY output: one ``.npy`` file per logged value and epoch, covariance matrices included.

Layout under the run folder ``savepath``::

    <savepath>/<name>/<name>_epoch<k>.npy
    <savepath>/npy_names.json          (the names in the order they were first logged)
    <savepath>.zip                     (with ``zip=True``: the same tree, beside the folder)

``k`` is the epoch (the ``global_step`` the tracker passes), so a value logged
only in some epochs (an eval run every other epoch) keeps its true epoch. A name
holding a character that cannot appear in a file name (``/``, ``\\``, ``:``...)
is percent-encoded in the folder and file name; :func:`load_npy_run` decodes it.
"""
from __future__ import annotations

import io
import json
import os
import re
import warnings
import zipfile
from typing import Any, Dict, List, Mapping, Optional, Tuple
from urllib.parse import quote, unquote

import numpy as np

from delve.writers._files import atomic_write_bytes
from delve.writers.base import AbstractWriter

#: File, beside the value folders, that lists the logged names in first-seen order.
MANIFEST = "npy_names.json"
_MANIFEST_VERSION = 1
_SAFE_CHARACTERS = " -_.,;=+()[]{}@#!~'"
_FILE_PATTERN = re.compile(r"^(?P<name>.+)_epoch(?P<epoch>\d+)\.npy$")


def _encode_name(name: str) -> str:
    encoded = quote(name, safe=_SAFE_CHARACTERS)
    return "%2E" + encoded[1:] if encoded.startswith(".") else encoded


def _as_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


class NPYWriter(AbstractWriter):
    """Save every logged value, arrays included, as ``<savepath>/<name>/<name>_epoch<k>.npy``.

    This is the writer that keeps the covariance matrices (statistic ``cov``),
    from which :func:`delve.reconstruct_csv_from_npy_data` recomputes saturation
    and intrinsic dimensionality at another threshold. Every file is written to
    a temporary name and renamed into place, so a crash never leaves a
    truncated ``.npy`` file.

    Parameters
    ----------
    savepath : str
        The run folder (the tracker's ``savefile``).
    zip : bool
        After every :meth:`save`, also write the tree to ``savepath + '.zip'``,
        beside the folder (atomically replaced).

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     writer = NPYWriter(os.path.join(folder, "run"))
    ...     writer.add_scalar("loss", 0.25, global_step=0)
    ...     writer.save()
    ...     float(np.load(os.path.join(folder, "run", "loss", "loss_epoch0.npy")))
    0.25
    """

    def __init__(self, savepath: str, zip: bool = False, **kwargs: Any) -> None:
        if not isinstance(zip, bool):
            raise ValueError(f"zip must be True or False, got {zip!r}")
        self.savepath = os.path.normpath(savepath)
        self.zip = zip
        self.epoch = 0
        self.names: List[str] = []
        self._written_names: List[str] = []
        self._warned: set = set()

    # ----------------------------------------------------------------- paths
    def _file(self, name: str, epoch: int) -> str:
        encoded = _encode_name(name)
        return os.path.join(self.savepath, encoded, f"{encoded}_epoch{epoch}.npy")

    def previous_outputs(self) -> List[str]:
        found = [path for files in _scan_folder(self.savepath).values() for path in files.values()]
        found += [
            path
            for path in (os.path.join(self.savepath, MANIFEST), self.savepath + ".zip")
            if os.path.isfile(path)
        ]
        return found

    def resume_from_saved_state(self, initial_epoch: int) -> None:
        """Keep the files of epochs before ``initial_epoch``, delete later ones, number on from it."""
        self.epoch = initial_epoch
        if not self._check_savestate_ok(self.savepath):
            return
        self.names = _read_manifest(self.savepath)
        for folder, files in _scan_folder(self.savepath).items():
            for epoch, path in files.items():
                if epoch >= initial_epoch:
                    os.unlink(path)
            name = unquote(folder)
            if name not in self.names and any(epoch < initial_epoch for epoch in files):
                self.names.append(name)
        self._write_manifest()

    # --------------------------------------------------------------- logging
    def add_scalar(self, name: str, value: Any, global_step: Optional[int] = None, **kwargs: Any) -> None:
        """Write ``value`` (a number or an array) for the epoch ``global_step`` (default: the current one)."""
        array = _as_array(value)
        if array.dtype == object:
            if name not in self._warned:
                self._warned.add(name)
                warnings.warn(
                    f"NPYWriter cannot store {name!r} of type {type(value).__name__}; log a number or a "
                    "numeric array",
                    stacklevel=2,
                )
            return
        epoch = self.epoch if global_step is None else int(global_step)
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        atomic_write_bytes(self._file(name, epoch), buffer.getvalue(), durable=False)
        if name not in self.names:
            self.names.append(name)

    def add_scalars(self, prefix: str, value_dict: Mapping[str, Any], **kwargs: Any) -> None:
        """Write every value of ``value_dict`` under ``prefix + name``."""
        for name, value in value_dict.items():
            self.add_scalar(prefix + name, value, **kwargs)

    def _write_manifest(self) -> None:
        if self.names == self._written_names:
            return
        content = {"version": _MANIFEST_VERSION, "names": self.names}
        atomic_write_bytes(os.path.join(self.savepath, MANIFEST), json.dumps(content, indent=1).encode())
        self._written_names = list(self.names)

    def _write_zip(self) -> None:
        base = os.path.basename(self.savepath)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            manifest = os.path.join(self.savepath, MANIFEST)
            if os.path.exists(manifest):
                archive.write(manifest, f"{base}/{MANIFEST}")
            for folder, files in sorted(_scan_folder(self.savepath).items()):
                for epoch in sorted(files):
                    archive.write(files[epoch], f"{base}/{folder}/{os.path.basename(files[epoch])}")
        atomic_write_bytes(self.savepath + ".zip", buffer.getvalue())

    def save(self) -> None:
        """Close the epoch: update the list of names and, with ``zip=True``, the archive."""
        if os.path.isdir(self.savepath) or self.names:
            os.makedirs(self.savepath, exist_ok=True)
            self._write_manifest()
            if self.zip:
                self._write_zip()
        self.epoch += 1

    def close(self) -> None:
        """Every file is complete when written; nothing stays open."""


def _read_manifest(folder: str) -> List[str]:
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return list(json.load(handle).get("names", []))


def _scan_folder(folder: str) -> Dict[str, Dict[int, str]]:
    """Encoded value folder -> {epoch: file path} for every ``<name>/<name>_epoch<k>.npy``."""
    found: Dict[str, Dict[int, str]] = {}
    if not os.path.isdir(folder):
        return found
    for entry in sorted(os.listdir(folder)):
        subfolder = os.path.join(folder, entry)
        if not os.path.isdir(subfolder):
            continue
        for file_name in os.listdir(subfolder):
            match = _FILE_PATTERN.match(file_name)
            if match and match["name"] == entry:
                found.setdefault(entry, {})[int(match["epoch"])] = os.path.join(subfolder, file_name)
    return found


def _load_from_zip(path: str) -> Tuple[List[str], Dict[str, Dict[int, np.ndarray]]]:
    names: List[str] = []
    values: Dict[str, Dict[int, np.ndarray]] = {}
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            parts = member.split("/")
            if len(parts) == 2 and parts[1] == MANIFEST:
                names = list(json.loads(archive.read(member)).get("names", []))
            elif len(parts) == 3:
                match = _FILE_PATTERN.match(parts[2])
                if match and match["name"] == parts[1]:
                    array = np.load(io.BytesIO(archive.read(member)), allow_pickle=False)
                    values.setdefault(unquote(parts[1]), {})[int(match["epoch"])] = array
    return names, values


def load_npy_run(path: str) -> Tuple[List[str], Dict[str, Dict[int, np.ndarray]]]:
    """Read back what an :class:`NPYWriter` wrote, from its folder or its ``.zip`` archive.

    Parameters
    ----------
    path : str
        The run folder (the writer's ``savepath``) or the archive ``savepath + '.zip'``.

    Returns
    -------
    names : list of str
        Every logged name, in the order first logged (names missing from the
        list of names are appended in alphabetical order).
    values : dict
        Name to ``{epoch: array}``.

    Raises
    ------
    FileNotFoundError
        If ``path`` is neither a folder nor a zip archive.
    """
    if os.path.isdir(path):
        names = _read_manifest(path)
        values = {
            unquote(folder): {epoch: np.load(file, allow_pickle=False) for epoch, file in files.items()}
            for folder, files in _scan_folder(path).items()
        }
    elif zipfile.is_zipfile(path):
        names, values = _load_from_zip(path)
    else:
        raise FileNotFoundError(f"{path!r} is neither the folder of an NPYWriter nor its .zip archive")
    ordered = [name for name in names if name in values]
    ordered += sorted(name for name in values if name not in ordered)
    return ordered, values
