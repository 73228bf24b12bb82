"""Which modules a tracker records, and the names they carry in every output.

Names are module paths from the given root joined with ``-`` (``features-0``,
``classifier``), as in delve 0.1.50. A layer given on its own (or in a list) is
named ``Module-<i>-<Type>``. Wrappers that only hold the real model
(DistributedDataParallel, DataParallel, FSDP1's FullyShardedDataParallel,
activation checkpointing's CheckpointWrapper, ``torch.compile``) add nothing to
the names. A module reached twice (shared) is tracked once, under its first path.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from torch import nn

from delve.adapters import (
    BLOCK_ADAPTER,
    AdapterOptions,
    LayerAdapter,
    check_layer_memory,
    find_adapter,
    find_layer_adapter,
    is_conv,
)
from delve.covariance import CovarianceMemoryError

ModuleSpec = Union[nn.Module, Iterable[nn.Module]]


#: Children under which wrappers keep the module they wrap: FSDP1's ``FullyShardedDataParallel``
#: and activation checkpointing's ``CheckpointWrapper``.
_WRAPPED_CHILDREN = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside DataParallel, DistributedDataParallel, FSDP1, checkpoint and ``torch.compile`` wrappers."""
    while True:
        wrapped = next((module._modules[name] for name in _WRAPPED_CHILDREN if name in module._modules), None)
        if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        elif wrapped is not None:
            module = wrapped
        else:
            return module


BlockTypes = Union[None, str, type, Iterable[Union[str, type]]]


def block_matcher(blocks: BlockTypes) -> Callable[[nn.Module], bool]:
    """A predicate telling whether a module is one of ``blocks``.

    Parameters
    ----------
    blocks : type, str, list of them, or None
        Module classes, or class names (``'GPT2Block'``, matched against the
        name of every class in a module's MRO, so no import is needed).

    Returns
    -------
    callable
        ``matches(module) -> bool``; always ``False`` for ``None``.

    Raises
    ------
    ValueError
        If an entry is neither a subclass of ``torch.nn.Module`` nor a str.

    Examples
    --------
    >>> matches = block_matcher(["Sequential"])
    >>> matches(nn.Sequential()), matches(nn.Linear(1, 1))
    (True, False)
    """
    if blocks is None:
        return lambda module: False
    entries = [blocks] if isinstance(blocks, (str, type)) else list(blocks)
    types, names = [], set()
    for entry in entries:
        if isinstance(entry, str) and entry:
            names.add(entry)
        elif isinstance(entry, type) and issubclass(entry, nn.Module):
            types.append(entry)
        else:
            raise ValueError(
                f"blocks must hold torch.nn.Module classes or class names (str), got {entry!r}"
            )
    kinds = tuple(types)

    def matches(module: nn.Module) -> bool:
        return isinstance(module, kinds) or any(cls.__name__ in names for cls in type(module).__mro__)

    return matches


def _walk(
    module: nn.Module,
    prefix: str,
    found: "OrderedDict[str, nn.Module]",
    seen: set,
    is_block: Callable[[nn.Module], bool],
) -> None:
    for child_name, child in module.named_children():
        if child is None or id(child) in seen:
            continue
        seen.add(id(child))
        path = child_name if not prefix else f"{prefix}-{child_name}"
        if is_block(child):
            found[_unique(path, found)] = child
            _walk(unwrap(child), path, found, seen, is_block)
        elif find_adapter(child) is not None:
            found[_unique(path, found)] = child
        else:
            _walk(unwrap(child), path, found, seen, is_block)


def _entry_layers(entry: nn.Module, index: int, is_block: Callable[[nn.Module], bool]) -> "OrderedDict[str, nn.Module]":
    root = unwrap(entry)
    if find_adapter(root) is not None:
        return OrderedDict([(f"Module-{index}-{type(root).__name__}", root)])
    found: "OrderedDict[str, nn.Module]" = OrderedDict()
    _walk(root, "", found, {id(root)}, is_block)
    return found


def _unique(name: str, taken: "OrderedDict[str, nn.Module]") -> str:
    """``name``, or ``name#2``, ``name#3``... if a layer of that name exists already (with a warning)."""
    if name not in taken:
        return name
    suffix = 2
    while f"{name}#{suffix}" in taken:
        suffix += 1
    unique = f"{name}#{suffix}"
    warnings.warn(
        f"two layers map to the name {name!r} (module paths are joined with '-'); the second is named {unique!r}",
        stacklevel=4,
    )
    return unique


def find_layers(
    modules: ModuleSpec, include_conv: bool = True, blocks: BlockTypes = None
) -> "OrderedDict[str, nn.Module]":
    """Supported layers under ``modules``, in registration (usually forward) order.

    Parameters
    ----------
    modules : torch.nn.Module or list of torch.nn.Module
        A model, a single layer, or a list of layers and models.
    include_conv : bool
        ``False`` leaves out every (transposed) convolution.
    blocks : type, str or list of them, optional
        Module types (or class names) whose whole output is tracked too (a
        transformer block, a ResNet stage); the layers inside them are found
        as usual.

    Returns
    -------
    OrderedDict
        Layer name to module. When two entries of a list would give the same
        name, each of those entries' names gets the prefix ``Module-<i>-``.
        Names are unique: a path that maps to a name already taken (a module
        named ``"x-0"`` beside ``x[0]``) gets a suffix ``#2``, with a warning.

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
    if isinstance(modules, nn.Module):
        entries: List[nn.Module] = [modules]
    elif isinstance(modules, Iterable) and not isinstance(modules, (str, bytes, Mapping)):
        entries = list(modules)
    else:
        raise TypeError(f"modules must be a torch.nn.Module or a list of them, got {type(modules).__name__}")
    for entry in entries:
        if not isinstance(entry, nn.Module):
            raise TypeError(f"modules must be a torch.nn.Module or a list of them, got {type(entry).__name__}")
    is_block = block_matcher(blocks)
    per_entry = [_entry_layers(entry, index, is_block) for index, entry in enumerate(entries)]
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
            result[_unique(name, result)] = layer
    return result


def layer_adapter(layer: nn.Module, is_block: Callable[[nn.Module], bool]) -> LayerAdapter:
    """How ``layer``'s outputs become samples: the block adapter for a block, else its type's.

    Raises
    ------
    ValueError
        If delve has no adapter for the layer's type (a ``layer_filter`` added it).
    """
    if is_block(layer):
        return BLOCK_ADAPTER
    adapter = find_layer_adapter(layer)
    if adapter is None:
        raise ValueError(f"layer_filter returned {type(layer).__name__}, a module delve cannot track")
    return adapter


def _explicit_layers(modules: ModuleSpec) -> set:
    """Identities of the layers given themselves in ``modules`` (not found inside a model)."""
    entries = [modules] if isinstance(modules, nn.Module) else list(modules)
    return {id(unwrap(entry)) for entry in entries if find_layer_adapter(unwrap(entry)) is not None}


def choose_layers(
    modules: ModuleSpec,
    layer_filter: Callable[[Dict[str, nn.Module]], Any],
    ignore_layer_names: List[str],
    include_conv: bool,
    blocks: BlockTypes,
    options: AdapterOptions,
    memory_budget: Optional[int],
) -> Tuple["OrderedDict[str, nn.Module]", Dict[str, int]]:
    """The layers a tracker records, and those ``memory_budget`` leaves out.

    The layers of :func:`find_layers`, through ``layer_filter``, without
    ``ignore_layer_names``. A layer found inside a model whose covariance would
    exceed ``memory_budget`` is left out with one warning listing all of them;
    a layer given itself in ``modules`` is refused instead.

    Returns
    -------
    tuple
        Layer name to module, and name to the bytes per mode of each layer left out.

    Raises
    ------
    ValueError
        Naming the parameter, when ``modules`` holds no trackable layer or is not
        a module (list), when ``layer_filter`` returns no dict, or when a layer
        given itself exceeds ``memory_budget``.
    """
    try:
        found = find_layers(modules, include_conv=include_conv, blocks=blocks)
    except TypeError as error:
        raise ValueError(str(error)) from None
    filtered = layer_filter(found)
    if not isinstance(filtered, Mapping):
        raise ValueError(f"layer_filter must return a dict of layer name to module, got {type(filtered).__name__}")
    chosen = OrderedDict((name, layer) for name, layer in filtered.items() if name not in ignore_layer_names)
    explicit = _explicit_layers(modules)
    is_block = block_matcher(blocks)
    skipped: Dict[str, int] = {}
    for name, layer in list(chosen.items()):
        try:
            check_layer_memory(name, layer, options, memory_budget)
        except CovarianceMemoryError:
            if id(layer) in explicit:
                raise
            dim = layer_adapter(layer, is_block).features(layer, options)
            skipped[name] = check_layer_memory(name, layer, options, None, dim=dim)
            del chosen[name]
    if skipped:
        listed = ", ".join(f"{name} ({nbytes / 2**30:.3g} GiB)" for name, nbytes in skipped.items())
        warnings.warn(
            f"delve leaves out {len(skipped)} layer(s) whose covariance would exceed memory_budget={memory_budget} "
            f"bytes per mode: {listed}. Raise memory_budget or pass the layer in modules to track it anyway.",
            RuntimeWarning,
            stacklevel=4,
        )
    if not chosen:
        raise ValueError(
            "modules contains no layer delve can track (after include_conv, layer_filter, "
            "ignore_layer_names and memory_budget); supported are Linear, Conv1D of transformers, "
            "Conv/ConvTranspose 1d-3d, RNN/LSTM/GRU and their cells, MultiheadAttention, blocks named in "
            "blocks=, and types added with delve.register_adapter"
        )
    return chosen, skipped

