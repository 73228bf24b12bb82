"""delve's logger, importable as in delve 0.1.50 (``from delve.logger import log``).

Unlike 0.1.50, importing it configures nothing: the logger ``'delve'`` has a
:class:`logging.NullHandler` and propagates to the application's handlers.
:class:`TqdmLoggingHandler` writes records through ``tqdm.write`` so that they
do not break progress bars; add it yourself if you want that.
"""
from __future__ import annotations

import logging

log = logging.getLogger("delve")
log.addHandler(logging.NullHandler())


class TqdmLoggingHandler(logging.Handler):
    """A logging handler that prints through ``tqdm.write`` (between progress bars)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record))
        except Exception:  # logging handlers report their own failures
            self.handleError(record)


__all__ = ["log", "TqdmLoggingHandler"]
