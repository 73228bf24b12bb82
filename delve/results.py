"""From recorded layers to statistics: merged over ranks, eigenvalues of all layers at once, each statistic.

:class:`StatisticsComputer` is what :meth:`delve.SaturationTracker.compute`
runs: it merges every recorder's accumulators (and per-class sums) over the
ranks of the tracker's process group, computes the covariance of every layer and
mode with data, their eigenvalues in one go (with a progress bar when that takes
long), and evaluates each requested statistic of :mod:`delve.statistics`.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from delve import distributed, metrics, statistics
from delve.classes import ClassMoments, merged_across_ranks
from delve.covariance import TorchCovarianceMatrix
from delve.hooks import LayerRecorder
from delve.writers.base import MODES

#: Seconds the eigendecompositions run before a progress bar shows (quick calls show none).
PROGRESS_DELAY_S = 2.0

#: Layers decomposed side by side per thread between two updates of the progress bar.
EIGEN_CHUNK = 4

#: Statistics for which float32 eigenvalues, recomputed in float64 wherever float32 could change the
#: intrinsic dimensionality at the threshold, give the float64 result; any other statistic asked for
#: (effective rank, determinant...) makes every eigendecomposition float64.
FLOAT32_SAFE = frozenset({"lsat", "idim", "cov", "trc", "samples", "embed", "nc1", "cdnv"})

Recorders = Mapping[str, LayerRecorder]


class StatisticsComputer:
    """The statistics of a tracker's recorders.

    Parameters
    ----------
    stats : list of str
        Keys of the statistics to compute (see :func:`delve.statistics.statistic_keys`).
    threshold : float
        ``sat_threshold``.
    layerwise : bool
        Return the per-layer values (``layerwise_sat``).
    average : bool
        Also return the mean saturation over layers per mode (``average_sat``).
    process_group : ProcessGroup, optional
        The ranks to merge over (``None``: all of them).
    """

    def __init__(
        self, stats: Sequence[str], threshold: float, layerwise: bool, average: bool, process_group: Any = None
    ) -> None:
        self.stats = list(stats)
        self.threshold = threshold
        self.layerwise = layerwise
        self.average = average
        self.process_group = process_group
        self._warned_few_samples: set = set()
        self._warned_unlabelled: set = set()
        self._skipped_reported: Dict[str, int] = {}

    def _float32_safe(self) -> bool:
        """Whether float32 eigenvalues (checked at the threshold) serve every statistic asked for."""
        return all(key in FLOAT32_SAFE for key in self.stats)

    def _synced_accumulators(self, recorders: Recorders) -> Dict[Tuple[str, str], TorchCovarianceMatrix]:
        """``(layer, mode)`` to accumulator, merged over all ranks under torch.distributed (local ones untouched)."""
        local = {
            (name, mode): state.accumulator
            for name, recorder in recorders.items()
            for mode, state in recorder.modes.items()
        }
        row_meshes = {
            name: recorder.row_mesh for name, recorder in recorders.items() if recorder.row_mesh is not None
        }
        distributed.check_row_meshes(row_meshes, self.process_group)
        return distributed.sync_accumulators(local, self.process_group)

    def _requested(self) -> List[statistics.Statistic]:
        entries = [statistics.get_statistic(key) for key in self.stats]
        if self.average and "lsat" not in self.stats:
            entries.append(statistics.get_statistic("lsat"))
        return entries

    def compute(self, recorders: Recorders) -> Dict[str, Any]:
        """Statistics of everything ``recorders`` hold, as :meth:`delve.SaturationTracker.compute`
        returns them (the recorders are left unchanged; a collective call under ``torch.distributed``)."""
        accumulators = self._synced_accumulators(recorders)
        requested = self._requested()
        counts = {key: accumulator.count for key, accumulator in accumulators.items()}
        active = [mode for mode in MODES if any(counts[(name, mode)] for name in recorders)]
        classes = self._synced_classes(recorders, {key: acc.dim or 0 for key, acc in accumulators.items()})
        keys = [(name, mode) for mode in active for name in recorders if counts[(name, mode)]]
        inputs = self._layer_inputs(keys, accumulators, counts, statistics.needs_eigenvalues(requested), classes)
        results: Dict[str, Any] = {}
        for mode in active:
            saturations = []
            for name in recorders:
                layer_inputs = inputs.get((name, mode))
                for entry in requested:
                    if entry.key not in self.stats:
                        continue
                    if layer_inputs is not None:
                        value = statistics.evaluate(entry, layer_inputs)
                    elif entry.array:
                        continue
                    else:
                        value = entry.empty
                    if self.layerwise:
                        results[f"{mode}-{entry.name}_{name}"] = value
                if self.average:
                    saturations.append(
                        np.nan if layer_inputs is None else metrics.saturation_from_eigenvalues(
                            layer_inputs.eigenvalues, self.threshold
                        )
                    )
            if self.average:
                finite = [value for value in saturations if not np.isnan(value)]
                results[f"average-{mode}-sat"] = float(np.mean(finite)) if finite else float("nan")
        self._warn_few_samples(inputs)
        return results

    def _synced_classes(
        self, recorders: Recorders, dims: Mapping[Tuple[str, str], int]
    ) -> Dict[Tuple[str, str], ClassMoments]:
        """``(layer, mode)`` to per-class sums merged over all ranks (empty without class statistics)."""
        local = {
            (name, mode): moments
            for name, recorder in recorders.items()
            if recorder.classes is not None
            for mode, moments in recorder.classes.items()
        }
        if not local:
            return {}
        return merged_across_ranks(local, {key: dims[key] for key in local}, self.process_group)

    def _complete_classes(
        self, key: Tuple[str, str], moments: Optional[ClassMoments], count: int
    ) -> Optional[ClassMoments]:
        """``moments`` if every sample of the layer had a label, else ``None`` (warned once per layer)."""
        if moments is None:
            return None
        labelled = round(moments.count)
        if labelled == count:
            return moments
        if key[0] not in self._warned_unlabelled:
            self._warned_unlabelled.add(key[0])
            warnings.warn(
                f"layer {key[0]!r} has labels for {labelled} of its {count} {key[1]} samples, so its "
                "class-conditional statistics are NaN: call tracker.set_labels(labels) before every forward pass "
                "(class statistics need one sample per input: a Linear on vectors, a pooled convolution)",
                RuntimeWarning,
                stacklevel=4,
            )
        return None

    def _layer_inputs(
        self,
        keys: Sequence[Tuple[str, str]],
        accumulators: Mapping[Tuple[str, str], TorchCovarianceMatrix],
        counts: Mapping[Tuple[str, str], int],
        with_eigenvalues: bool,
        classes: Mapping[Tuple[str, str], ClassMoments],
    ) -> Dict[Tuple[str, str], statistics.LayerInputs]:
        """Inputs of the statistics of the ``(layer, mode)`` ``keys`` (eigenvalues of all in one go)."""
        covariances = [accumulators[key].compute() for key in keys]
        eigenvalues: List[Optional[torch.Tensor]] = [None] * len(keys)
        if with_eigenvalues:
            eigenvalues = list(self._eigenvalues(covariances, self._float32_safe()))
        return {
            key: statistics.LayerInputs(
                covariance=covariance,
                mean=accumulators[key].mean,
                count=counts[key],
                threshold=self.threshold,
                samples=accumulators[key].saved_samples,
                eigenvalues=values,
                classes=self._complete_classes(key, classes.get(key), counts[key]),
            )
            for key, covariance, values in zip(keys, covariances, eigenvalues)
        }

    def _eigenvalues(self, covariances: Sequence[torch.Tensor], float32_safe: bool) -> Iterator[torch.Tensor]:
        """Eigenvalues of every covariance, a few layers side by side (:func:`delve.metrics.eigenvalues_many`),
        with a progress bar when it takes more than two seconds.

        With ``float32_safe`` (only saturation and intrinsic dimensionality asked
        for), matrices are decomposed in float32 and again in float64 only where
        float32 could change the intrinsic dimensionality.
        """
        from tqdm.auto import tqdm

        thresh = self.threshold if float32_safe else None
        step = EIGEN_CHUNK * max(1, torch.get_num_threads())
        with tqdm(
            total=len(covariances),
            desc="delve: eigendecompositions",
            unit="layer",
            delay=PROGRESS_DELAY_S,
            leave=False,
            disable=not distributed.is_main_process(self.process_group),
        ) as progress:
            for start in range(0, len(covariances), step):
                chunk = covariances[start : start + step]
                yield from metrics.eigenvalues_many(chunk, thresh=thresh)
                progress.update(len(chunk))

    def _warn_few_samples(self, inputs: Mapping[Tuple[str, str], statistics.LayerInputs]) -> None:
        """One warning naming every layer that saw fewer samples than it has features (each layer once per run)."""
        listed = []
        for (name, mode), layer_inputs in inputs.items():
            features = layer_inputs.covariance.shape[0]
            if layer_inputs.count < features and name not in self._warned_few_samples:
                self._warned_few_samples.add(name)
                bound = layer_inputs.count / features
                listed.append(f"{name!r} ({layer_inputs.count} samples in {mode} mode, {features} features: "
                              f"at most {bound:.3g})")
        if listed:
            warnings.warn(
                f"{len(listed)} layer(s) saw fewer samples than they have features, so their saturation is "
                f"bounded by samples / features, not by what the layer does: {'; '.join(listed)}. Record more "
                "batches (or more rows per batch) before reading them.",
                RuntimeWarning,
                stacklevel=4,
            )

    def warn_skipped_batches(self, recorders: Recorders, epoch: int, cumulative: bool) -> None:
        """One warning per epoch in which batches were left out, with the counts per layer.

        Parameters
        ----------
        recorders : mapping
            The tracker's recorders.
        epoch : int
            The epoch the warning names.
        cumulative : bool
            Whether the accumulators keep their counts across epochs
            (``reset_covariance=False``), so that only the increase is new.
        """
        counts = []
        for name, recorder in recorders.items():
            total = sum(state.accumulator.num_skipped_batches for state in recorder.modes.values())
            new = total - self._skipped_reported.get(name, 0)
            self._skipped_reported[name] = total if cumulative else 0
            if new > 0:
                counts.append(f"{new} of {name!r}")
        if counts:
            warnings.warn(
                f"delve left out batches in epoch {epoch}: {', '.join(counts)}, because they held NaN or "
                "Inf or values too large to square in float32 (beyond about 1e18); the statistics use the "
                "other batches",
                RuntimeWarning,
                stacklevel=4,
            )
