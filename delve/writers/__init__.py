"""Writers: where delve's statistics go (CSV, plots, npy, TensorBoard, console, W&B, MLflow).

``save_to`` of :class:`~delve.SaturationTracker` takes a key of :data:`WRITERS`,
an :class:`AbstractWriter` instance, or a list of either. Each backend lives in
its own module and is imported only when used, so ``import delve`` stays fast.

========================================= =============================================
key                                       writes
========================================= =============================================
``csv``                                   ``<savefile>.csv``, one row per epoch
``plot``, ``plotcsv``, ``csvplot``,       the CSV, plus PNGs in ``<savefile>/``
``csvplotting``
``npy``                                   ``<savefile>/<name>/<name>_epoch<k>.npy``
``tensorboard``, ``tb``                   event files in ``<savefile>/``
``print``                                 ``name: value`` lines
``console``                               one tqdm bar per layer
``wandb``                                 a Weights & Biases run (``delve[wandb]``)
``mlflow``                                an MLflow run (``delve[mlflow]``)
========================================= =============================================

The plotting helpers of delve 0.1.50 (:func:`extract_layer_stat`,
:func:`plot_stat`, :func:`plot_stat_level_from_results`,
:func:`plot_scatter_from_results`) are importable from here too.
"""
from __future__ import annotations

import importlib
from collections.abc import MutableMapping
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

from delve.writers.base import STATMAP, AbstractWriter, CompositWriter, parse_stat_name

class WriterRegistry(MutableMapping):
    """Writer keys accepted by ``save_to`` and the writer class each builds, imported on first use.

    ``WRITERS['csv']`` is the class (``WRITERS['csv'](savepath)`` builds a
    writer, as in delve 0.1.50). Add a key of your own with
    ``WRITERS['mine'] = MyWriter`` (or a ``'module:Class'`` string, imported
    when first used); it is then valid in ``save_to``.
    """

    def __init__(self, targets: Mapping[str, Union[str, type]]) -> None:
        self._targets: Dict[str, Union[str, type]] = dict(targets)

    def __getitem__(self, key: str) -> type:
        target = self._targets[key]
        if isinstance(target, str):
            module_name, class_name = target.split(":")
            target = getattr(importlib.import_module(module_name), class_name)
        return target

    def __setitem__(self, key: str, target: Union[str, type]) -> None:
        valid_class = isinstance(target, type) and issubclass(target, AbstractWriter)
        if not isinstance(key, str) or not (valid_class or (isinstance(target, str) and ":" in target)):
            raise ValueError(
                f"WRITERS[{key!r}] must be a subclass of AbstractWriter or a 'module:Class' string, got {target!r}"
            )
        self._targets[key] = target

    def __delitem__(self, key: str) -> None:
        del self._targets[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._targets)

    def __len__(self) -> int:
        return len(self._targets)

    def __repr__(self) -> str:
        return f"WriterRegistry({list(self._targets)})"


#: Writer keys accepted by ``save_to`` and the class each builds.
WRITERS = WriterRegistry(
    {
        "csv": "delve.writers.csv:CSVWriter",
        "npy": "delve.writers.npy:NPYWriter",
        "print": "delve.writers.print:PrintWriter",
        "console": "delve.writers.console:ConsoleWriter",
        "tb": "delve.writers.tensorboard:TensorBoardWriter",
        "tensorboard": "delve.writers.tensorboard:TensorBoardWriter",
        "csvplotting": "delve.writers.plot:CSVandPlottingWriter",
        "csvplot": "delve.writers.plot:CSVandPlottingWriter",
        "plot": "delve.writers.plot:CSVandPlottingWriter",
        "plotcsv": "delve.writers.plot:CSVandPlottingWriter",
        "wandb": "delve.writers.wandb:WandbWriter",
        "mlflow": "delve.writers.mlflow:MLflowWriter",
    }
)

_LAZY_NAMES: Dict[str, str] = {
    "CSVWriter": "delve.writers.csv",
    "NPYWriter": "delve.writers.npy",
    "PrintWriter": "delve.writers.print",
    "ConsoleWriter": "delve.writers.console",
    "TensorBoardWriter": "delve.writers.tensorboard",
    "CSVandPlottingWriter": "delve.writers.plot",
    "extract_layer_stat": "delve.writers.plotting",
    "plot_stat": "delve.writers.plotting",
    "plot_stat_level_from_results": "delve.writers.plotting",
    "plot_scatter_from_results": "delve.writers.plotting",
}

SaveTo = Union[str, AbstractWriter, Sequence[Union[str, AbstractWriter]]]


def check_save_to(save_to: Any) -> None:
    """Raise a ValueError naming the valid keys if ``save_to`` names an unknown writer."""
    entries = save_to if isinstance(save_to, (list, tuple)) else [save_to]
    if not entries:
        raise ValueError("save_to must name at least one writer")
    for entry in entries:
        if isinstance(entry, AbstractWriter):
            continue
        if not isinstance(entry, str) or entry not in WRITERS:
            raise ValueError(
                f"save_to={entry!r} is not a writer; use an AbstractWriter instance or one of "
                f"{', '.join(map(repr, WRITERS))}"
            )


def build_writer(save_to: SaveTo, writer_args: Optional[Mapping[str, Any]] = None) -> AbstractWriter:
    """Build the writer described by ``save_to``.

    Parameters
    ----------
    save_to : str, AbstractWriter or list of them
        A key of :data:`WRITERS`, a writer instance, or a list of either (which
        gives a :class:`CompositWriter`).
    writer_args : dict, optional
        Keyword arguments for the writers built from keys (``savepath`` among them).

    Returns
    -------
    AbstractWriter
    """
    check_save_to(save_to)
    args = dict(writer_args or {})
    if isinstance(save_to, (list, tuple)):
        return CompositWriter([build_writer(entry, args) for entry in _distinct_writers(save_to)])
    if isinstance(save_to, AbstractWriter):
        return save_to
    return WRITERS[save_to](**args)


def _distinct_writers(entries: Sequence[Union[str, AbstractWriter]]) -> List[Union[str, AbstractWriter]]:
    """Keys that build the same class once, and none whose files another one writes already.

    ``['csv', 'plot']`` keeps only ``'plot'``, whose writer (a CSVWriter subclass)
    writes the CSV too: two writers of one file would write every row twice.
    """
    classes = {entry: WRITERS[entry] for entry in entries if isinstance(entry, str)}
    kept: List[Union[str, AbstractWriter]] = []
    kept_classes: List[type] = []
    for entry in entries:
        if isinstance(entry, AbstractWriter):
            kept.append(entry)
            continue
        cls = classes[entry]
        if cls in kept_classes or any(issubclass(other, cls) and other is not cls for other in classes.values()):
            continue
        kept.append(entry)
        kept_classes.append(cls)
    return kept


def __getattr__(name: str) -> Any:
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    raise AttributeError(f"module 'delve.writers' has no attribute {name!r}")


__all__ = [
    "STATMAP",
    "WRITERS",
    "WriterRegistry",
    "AbstractWriter",
    "CompositWriter",
    "build_writer",
    "check_save_to",
    "parse_stat_name",
    *_LAZY_NAMES,
]
