"""Console output: one tqdm progress bar per layer whose fill is the layer's saturation.

After each epoch the terminal shows, as in delve's README::

    epoch 3 | loss=0.2318 | accuracy=0.91
    train linear1:  90%|█████████████████████████▏  | idim 9
    train linear2:  18%|█████                        | idim 2
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict, List, Mapping, Optional, TextIO, Tuple

import numpy as np

from delve.writers.base import AbstractWriter, parse_stat_name

_BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}|"


class ConsoleWriter(AbstractWriter):
    """Show each layer's saturation as a tqdm bar (0-100 %), refreshed at every :meth:`save`.

    One bar per mode and layer, in the order the layers were first logged, and
    above them a line with the epoch and the user's scalars (loss, accuracy...).
    The bar's postfix shows the intrinsic dimensionality when it is logged.

    Parameters
    ----------
    stream : file-like, optional
        Where tqdm draws; ``sys.stderr`` (tqdm's default) when ``None``.
    ncols : int, optional
        Width of each line; the terminal's width when ``None``.

    Examples
    --------
    >>> import io
    >>> stream = io.StringIO()
    >>> writer = ConsoleWriter(stream=stream, ncols=60)
    >>> writer.add_scalars("", {"train-saturation_linear1": 0.9}, global_step=0)
    >>> writer.save(); writer.close()
    >>> "train linear1:  90%" in stream.getvalue()
    True
    """

    def __init__(self, stream: Optional[TextIO] = None, ncols: Optional[int] = None, **kwargs: Any) -> None:
        self.stream = stream
        self.ncols = ncols
        self.epoch = 0
        self._bars: Dict[Tuple[str, str], Any] = {}
        self._status: Any = None
        self._saturation: Dict[Tuple[str, str], float] = {}
        self._idim: Dict[Tuple[str, str], Any] = {}
        self._scalars: Dict[str, Any] = {}

    def resume_from_saved_state(self, initial_epoch: int) -> None:
        """Number epochs on from ``initial_epoch``; the console keeps no other state."""
        self.epoch = initial_epoch

    def add_scalar(self, name: str, value: Any, global_step: Optional[int] = None, **kwargs: Any) -> None:
        """Remember a saturation, an intrinsic dimensionality or a user scalar for the next refresh."""
        if global_step is not None:
            self.epoch = int(global_step)
        parsed = parse_stat_name(name)
        if parsed is None:
            if isinstance(value, (numbers.Number, np.generic)) and not isinstance(value, bool):
                self._scalars[name] = value
            return
        key = (parsed.mode, parsed.layer)
        if parsed.stat == "lsat":
            self._saturation[key] = float(value)
        elif parsed.stat == "idim":
            self._idim[key] = value

    def add_scalars(self, prefix: str, value_dict: Mapping[str, Any], **kwargs: Any) -> None:
        """Remember every value of ``value_dict`` under ``prefix + name``."""
        for name, value in value_dict.items():
            self.add_scalar(prefix + name, value, **kwargs)

    def _new_bar(self, position: int, description: str, percent: float, bar_format: str) -> Any:
        from tqdm import tqdm

        return tqdm(
            total=100,
            initial=percent,
            desc=description,
            position=position,
            bar_format=bar_format,
            file=self.stream,
            ncols=self.ncols,
            leave=True,
        )

    def _status_line(self) -> str:
        parts: List[str] = [f"epoch {self.epoch}"]
        for name, value in self._scalars.items():
            parts.append(f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}")
        return " | ".join(parts)

    def save(self) -> None:
        """Redraw the bars with this epoch's values and start the next epoch."""
        if self._saturation or self._scalars:
            if self._status is None:
                from tqdm import tqdm

                self._status = tqdm(total=0, position=0, bar_format="{desc}", file=self.stream, leave=True)
            self._status.set_description_str(self._status_line(), refresh=True)
        width = max((len(f"{mode} {layer}") for mode, layer in self._saturation), default=0)
        notes = {}
        for key, saturation in self._saturation.items():
            idim = self._idim.get(key)
            notes[key] = " no data" if math.isnan(saturation) else ("" if idim is None else f" idim {idim}")
        note_width = max((len(note) for note in notes.values()), default=0)
        for key, saturation in self._saturation.items():
            description = f"{key[0]} {key[1]}".ljust(width)
            percent = 0.0 if math.isnan(saturation) else round(100 * saturation, 1)
            note = notes[key].ljust(note_width)
            bar_format = _BAR_FORMAT + note.replace("{", "{{").replace("}", "}}")
            bar = self._bars.get(key)
            if bar is None:
                self._bars[key] = self._new_bar(len(self._bars) + 1, description, percent, bar_format)
                continue
            bar.bar_format = bar_format
            bar.set_description_str(description, refresh=False)
            bar.n = percent
            bar.refresh()
        self._saturation.clear()
        self._idim.clear()
        self._scalars.clear()
        self.epoch += 1

    def close(self) -> None:
        """Close the bars, leaving their last state on screen; a second call does nothing."""
        if self._status is not None:
            self._status.close()
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
        self._status = None
