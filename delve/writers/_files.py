"""Crash-safe file primitives shared by the writers."""
from __future__ import annotations

import os
import tempfile


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str, data: bytes, durable: bool = True) -> None:
    """Replace ``path`` by ``data`` so that a crash leaves either the old or the new file.

    The bytes go to a temporary file in the same folder and the temporary file
    is renamed over ``path`` (an atomic ``os.replace``), which is enough when
    the process dies. With ``durable`` the bytes are also forced to disk
    (``fsync``) before the rename, so a power loss cannot leave an empty file
    either; the writers skip it for the many small files they can afford to lose
    on a power cut (npy values, PNGs).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp_path = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    try:
        # mkstemp creates the file 0600; give it the mode open(path, "w") would (0666 minus the umask),
        # so that colleagues and servers running as other users can read it.
        os.fchmod(handle, 0o666 & ~_current_umask())
        with os.fdopen(handle, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            if durable:
                os.fsync(tmp.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise


def append_bytes(path: str, data: bytes) -> None:
    """Append ``data`` to ``path`` in one ``write`` call, so a killed process never leaves half of it."""
    handle = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        written = os.write(handle, data)
        if written != len(data):
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes")
    finally:
        os.close(handle)
