"""Which modules a tracker records, and the names they carry in every output.

Names are module paths from the given root joined with ``-`` (``features-0``,
``classifier``), as in delve 0.1.50. A layer given on its own (or in a list) is
named ``Module-<i>-<Type>``. Wrappers that only hold the real model
(DistributedDataParallel, DataParallel, ``torch.compile``) add nothing to the
names. A module reached twice (shared) is tracked once, under its first path.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Iterable, List, Union

from torch import nn

from delve.adapters import find_adapter, is_conv

ModuleSpec = Union[nn.Module, Iterable[nn.Module]]


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside DataParallel/DistributedDataParallel/``torch.compile`` wrappers."""
    while True:
        if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module


def _walk(module: nn.Module, prefix: str, found: "OrderedDict[str, nn.Module]", seen: set) -> None:
    for child_name, child in module.named_children():
        if child is None or id(child) in seen:
            continue
        seen.add(id(child))
        path = child_name if not prefix else f"{prefix}-{child_name}"
        if find_adapter(child) is not None:
            found[path] = child
        else:
            _walk(unwrap(child), path, found, seen)


def _entry_layers(entry: nn.Module, index: int) -> "OrderedDict[str, nn.Module]":
    root = unwrap(entry)
    if find_adapter(root) is not None:
        return OrderedDict([(f"Module-{index}-{type(root).__name__}", root)])
    found: "OrderedDict[str, nn.Module]" = OrderedDict()
    _walk(root, "", found, {id(root)})
    return found


def find_layers(modules: ModuleSpec, include_conv: bool = True) -> "OrderedDict[str, nn.Module]":
    """Supported layers under ``modules``, in registration (usually forward) order.

    Parameters
    ----------
    modules : torch.nn.Module or list of torch.nn.Module
        A model, a single layer, or a list of layers and models.
    include_conv : bool
        ``False`` leaves out every (transposed) convolution.

    Returns
    -------
    OrderedDict
        Layer name to module. When two entries of a list would give the same
        name, each of those entries' names gets the prefix ``Module-<i>-``.

    Raises
    ------
    TypeError
        If ``modules`` (or an element of it) is not a ``torch.nn.Module``.

    Examples
    --------
    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    >>> list(find_layers(net)), list(find_layers(net, include_conv=False))
    (['0', '3'], ['3'])
    >>> list(find_layers([nn.Linear(2, 2), net]))
    ['Module-0-Linear', '0', '3']
    """
    entries: List[nn.Module] = [modules] if isinstance(modules, nn.Module) else list(modules)
    for entry in entries:
        if not isinstance(entry, nn.Module):
            raise TypeError(f"modules must be a torch.nn.Module or a list of them, got {type(entry).__name__}")
    per_entry = [_entry_layers(entry, index) for index, entry in enumerate(entries)]
    owners: Dict[str, List[int]] = {}
    for index, layers in enumerate(per_entry):
        for name in layers:
            owners.setdefault(name, []).append(index)
    clashing = {i for indices in owners.values() if len(indices) > 1 for i in indices}
    result: "OrderedDict[str, nn.Module]" = OrderedDict()
    seen_modules: set = set()
    for index, layers in enumerate(per_entry):
        for name, layer in layers.items():
            if id(layer) in seen_modules or (not include_conv and is_conv(layer)):
                continue
            seen_modules.add(id(layer))
            if index in clashing and not name.startswith(f"Module-{index}-"):
                name = f"Module-{index}-{name}"
            result[name] = layer
    return result
