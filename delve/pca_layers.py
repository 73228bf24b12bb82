r"""Layers that project activations onto the eigenspace of their own covariance.

A PCA layer is inserted after a layer of a network. While the network trains
(``module.training`` is true) it passes its input through unchanged and folds
it into a running covariance (:class:`delve.covariance.TorchCovarianceMatrix`).
At the first evaluation call after training it eigendecomposes what it saw,

.. math::

    Q = V \operatorname{diag}(\lambda_1 \ge \dots \ge \lambda_d) V^T,

keeps the :math:`k` leading eigenvectors, :math:`k` being the smallest number
that explain ``threshold`` of the variance (:mod:`delve.metrics`), and from
then on, in evaluation, returns

.. math::

    y = (x - \mu) V_k V_k^T + \mu

with :math:`\mu` the mean of the training inputs (``centering=True``), or
:math:`y = x V_k V_k^T` with :math:`Q` the uncentered second moment
(``centering=False``). With ``keepdim=False`` a :class:`LinearPCALayer` returns
the :math:`k` coordinates :math:`(x - \mu) V_k` instead. Each new training
phase starts a new covariance, so the projection always describes the latest
epoch. Everything the projection needs lives in registered buffers, so it is
saved and restored with the model's ``state_dict``.

This lets one measure how much accuracy a network keeps when every layer is
restricted to the subspace its data actually uses (arXiv 2006.08679).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from delve import metrics
from delve.covariance import TorchCovarianceMatrix

log = logging.getLogger(__name__)

RandomState = Union[None, int, np.random.Generator, np.random.RandomState]


def rvs(dim: int = 3, random_state: RandomState = None) -> np.ndarray:
    """Random orthonormal matrix of size ``dim`` with determinant +1.

    The QR decomposition of a matrix of standard normal entries, with the signs
    of ``Q``'s columns fixed by the diagonal of ``R``, is distributed uniformly
    (Haar) over the orthogonal group (Mezzadri, "How to generate random matrices
    from the classical compact groups", 2007); flipping the first column when the
    determinant is negative makes it uniform over the rotations, as
    :func:`scipy.stats.special_ortho_group` is.

    Parameters
    ----------
    dim : int
        Size of the matrix, at least 1.
    random_state : None, int, numpy.random.Generator or numpy.random.RandomState
        Source of randomness; ``None`` uses NumPy's global random state (so
        ``np.random.seed`` makes it repeatable, as in delve 0.1.50).

    Returns
    -------
    numpy.ndarray
        Float64 array of shape ``(dim, dim)`` whose columns are orthonormal.

    Examples
    --------
    >>> q = rvs(4, random_state=0)
    >>> bool(np.allclose(q.T @ q, np.eye(4))), round(float(np.linalg.det(q)), 6)
    (True, 1.0)
    """
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"dim must be an int >= 1, got {dim!r}")
    if random_state is None:
        gaussian = np.random.standard_normal((dim, dim))
    elif isinstance(random_state, (np.random.Generator, np.random.RandomState)):
        gaussian = random_state.standard_normal((dim, dim))
    else:
        gaussian = np.random.default_rng(random_state).standard_normal((dim, dim))
    q, r = np.linalg.qr(gaussian)
    signs = np.sign(np.diag(r))
    signs[signs == 0] = 1.0
    q = q * signs
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _check_downsampling(downsampling: Optional[int]) -> Optional[int]:
    if downsampling is not None and (
        isinstance(downsampling, bool) or not isinstance(downsampling, int) or downsampling < 1
    ):
        raise ValueError(f"downsampling must be None or an int >= 1, got {downsampling!r}")
    return downsampling


class LinearPCALayer(nn.Module):
    """Project features onto the eigenspace that explains ``threshold`` of their variance.

    Insert it after a layer whose outputs have ``in_features`` features (the
    last dimension; leading dimensions are samples). See the module docstring
    for the projection.

    Parameters
    ----------
    in_features : int
        Size of the last dimension of the input.
    threshold : float
        Share of the variance the kept eigendirections explain, in (0, 1].
    keepdim : bool
        ``True``: return the projection in the input space (same shape as the
        input). ``False``: return the ``k`` coordinates in the eigenbasis.
    verbose : bool
        Log (``logging.INFO``, logger ``delve.pca_layers``) the saturation each
        time the projection is computed.
    gradient_epoch_start : int
        Kept for compatibility with delve 0.1.50, which stored it but never used
        it; it has no effect.
    centering : bool
        Subtract the training mean before projecting and add it back after.

    Attributes
    ----------
    pca_computed : bool
        Whether the projection is up to date with the training data seen.
    epoch : int
        How many times a projection was computed.

    Raises
    ------
    RuntimeError
        On an evaluation call before the layer saw any training data (and no
        projection was loaded with ``load_state_dict``).

    Examples
    --------
    >>> layer = LinearPCALayer(3, threshold=0.9)
    >>> _ = layer(torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.1, 0.0]]))
    >>> _ = layer.eval()
    >>> layer(torch.tensor([[2.0, 5.0, 5.0]])).round(decimals=3)
    tensor([[2.0000, 0.0330, 0.0000]])
    >>> layer.in_dim, layer.fs_dim
    (1, 3)
    """

    #: Number of PCA layers created so far; names them ``pca0``, ``pca1``... (as in 0.1.50).
    num = 0
    _version = 2

    def __init__(
        self,
        in_features: int,
        threshold: float = 0.99,
        keepdim: bool = True,
        verbose: bool = False,
        gradient_epoch_start: int = 20,
        centering: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be an int >= 1, got {in_features!r}")
        threshold = metrics.check_share("threshold", threshold)
        dim = in_features
        self.register_buffer("_threshold", torch.tensor(threshold, dtype=torch.float64))
        self.register_buffer("_centering", torch.tensor(bool(centering)))
        self.register_buffer("num_components", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("covariance", torch.zeros(dim, dim, dtype=torch.float64))
        self.register_buffer("eigenvalues", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("eigenvectors", torch.zeros(dim, dim, dtype=torch.float64))
        self.register_buffer("transformation_matrix", torch.zeros(dim, dim, dtype=torch.float32))
        self.in_features = dim
        self.keepdim = bool(keepdim)
        self.verbose = bool(verbose)
        self.gradient_epoch = gradient_epoch_start
        self.epoch = 0
        self.pca_computed = False
        self.name = f"pca{LinearPCALayer.num}"
        LinearPCALayer.num += 1
        self._accumulator = TorchCovarianceMatrix()
        # Host copies of the scalar buffers, so that forward never reads a device tensor.
        self._threshold_value = threshold
        self._centering_value = bool(centering)
        self._num_kept = 0

    # ----------------------------------------------------------- properties
    def is_floating_point(self) -> bool:
        """``False``, as in delve 0.1.50: the layer is not a floating point tensor."""
        return False

    @property
    def threshold(self) -> float:
        """Share of the variance the projection keeps; setting it recomputes the projection."""
        return self._threshold_value

    @threshold.setter
    def threshold(self, threshold: float) -> None:
        self._threshold_value = metrics.check_share("threshold", threshold)
        self._threshold.fill_(self._threshold_value)
        self._refresh(decompose=False)

    @property
    def centering(self) -> bool:
        """Whether the mean is removed before projecting; setting it refits the eigenspace."""
        return self._centering_value

    @centering.setter
    def centering(self, centering: bool) -> None:
        self._centering_value = bool(centering)
        self._centering.fill_(self._centering_value)
        self._refresh(decompose=True)

    @property
    def in_dim(self) -> int:
        """Number of kept eigendirections ``k`` (0 before the first projection)."""
        return self._num_kept

    @property
    def fs_dim(self) -> int:
        """Dimension of the feature space."""
        return self.in_features

    @property
    def sat(self) -> float:
        """Saturation in percent, ``100 * k / d``, rounded to 4 decimals (as in 0.1.50)."""
        return round(100.0 * self._num_kept / self.in_features, 4)

    @property
    def reduced_transformation_matrix(self) -> torch.Tensor:
        """The ``k`` kept eigenvectors as columns, shape ``(d, k)``."""
        return self.eigenvectors[:, : self._num_kept]

    # ----------------------------------------------------------------- fit
    def _accumulate(self, samples: torch.Tensor) -> None:
        self.pca_computed = False
        self._accumulator.update(samples)

    def _fit(self) -> None:
        """Replace the projection by the one of the data accumulated since the last fit."""
        accumulator = self._accumulator
        if self._has_pending_data():
            self.mean.copy_(accumulator.mean)
            self.covariance.copy_(accumulator.compute())
            accumulator.reset()
            self._decompose()
            self.epoch += 1
        self.pca_computed = True

    def _has_pending_data(self) -> bool:
        return self._accumulator.is_initialized and self._accumulator.count > 0

    def _refresh(self, decompose: bool) -> None:
        """Apply a new threshold or centering to the projection.

        In evaluation, training data not fitted yet is fitted now (with the new
        setting); otherwise the current projection is recomputed from the stored
        covariance (``decompose``) or eigenvalues.
        """
        if not self.training and not self.pca_computed and self._has_pending_data():
            self._fit()
        elif self._num_kept:
            if decompose:
                self._decompose()
            else:
                self._select_components()

    def _decompose(self) -> None:
        matrix = self.covariance.to(torch.float64)
        if not self._centering_value:
            mean = self.mean.to(torch.float64)
            matrix = matrix + torch.outer(mean, mean)
        values, vectors = torch.linalg.eigh(matrix)
        self.eigenvalues.copy_(values.flip(0).clamp_min(0.0))
        self.eigenvectors.copy_(vectors.flip(1))
        self._select_components()

    def _select_components(self) -> None:
        kept = metrics.intrinsic_dimensionality_from_eigenvalues(self.eigenvalues, self._threshold_value)
        # A layer without variance still needs one direction for keepdim=False.
        self._set_projection(self.eigenvectors.to(torch.float64)[:, : max(kept, 1)])

    def _set_projection(self, basis: torch.Tensor) -> None:
        self._num_kept = basis.shape[1]
        self.num_components.fill_(self._num_kept)
        self.transformation_matrix.copy_(basis @ basis.T)
        if self.verbose:
            log.info(
                "%s: keeps %d of %d directions (saturation %.4g%%)",
                self.name,
                self._num_kept,
                self.in_features,
                self.sat,
            )

    def _check_ready(self) -> None:
        if not self.pca_computed:
            self._fit()
        if not self._num_kept:
            raise RuntimeError(
                f"{type(self).__name__} {self.name} has no projection yet: run the model in "
                "training mode (model.train()) on some data before evaluating it, or load a "
                "state_dict that holds a computed projection"
            )

    def get_extra_state(self) -> Dict[str, Any]:
        """Training data accumulated since the last fit, so that a checkpoint taken mid-epoch keeps it."""
        return self._accumulator.state_dict()

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        """Restore what :meth:`get_extra_state` returned."""
        self._accumulator.load_state_dict(state)

    def _load_from_state_dict(
        self,
        state_dict: Dict[str, Any],
        prefix: str,
        local_metadata: Dict[str, Any],
        strict: bool,
        missing_keys: List[str],
        unexpected_keys: List[str],
        error_msgs: List[str],
    ) -> None:
        if local_metadata.get("version", 1) < 2 and prefix + "sum_squares" in state_dict:
            self._convert_legacy_state(state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._threshold_value = float(self._threshold)
        self._centering_value = bool(self._centering)
        self._num_kept = int(self.num_components)
        self.pca_computed = False

    def _convert_legacy_state(self, state_dict: Dict[str, Any], prefix: str) -> None:
        """Rewrite, in place, the entries of a delve 0.1.50 PCA layer into this layout.

        0.1.50 saved the eigendecomposition but not the projection; the projection
        is rebuilt from it (with delve's definition of the kept dimension). The
        running sums of 0.1.50 are dropped, and ``mean`` keeps the zeros 0.1.50
        actually subtracted.
        """
        for legacy in ("sum_squares", "seen_samples", "running_sum"):
            state_dict.pop(prefix + legacy, None)
        for legacy in list(state_dict):
            if legacy.startswith((prefix + "convolution.", prefix + "mean_subtracting_convolution.")):
                del state_dict[legacy]
        threshold = state_dict[prefix + "_threshold"].reshape(())
        values = state_dict[prefix + "eigenvalues"].to(torch.float64)
        vectors = state_dict[prefix + "eigenvectors"].to(torch.float64)
        kept = 0
        if float(values.sum()) > 0:
            kept = max(metrics.intrinsic_dimensionality_from_eigenvalues(values, float(threshold)), 1)
        basis = vectors[:, :kept]
        state_dict[prefix + "_threshold"] = threshold
        state_dict[prefix + "_centering"] = torch.tensor(self._centering_value)
        state_dict[prefix + "num_components"] = torch.tensor(kept, dtype=torch.int64)
        state_dict[prefix + "covariance"] = vectors @ torch.diag(values) @ vectors.T
        state_dict[prefix + "transformation_matrix"] = basis @ basis.T
        state_dict[prefix + "_extra_state"] = TorchCovarianceMatrix().state_dict()

    # ------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Training: accumulate and return ``x``. Evaluation: return the projection."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects {self.in_features} features in the last dimension, "
                f"got input of shape {tuple(x.shape)}"
            )
        if self.training:
            self._accumulate(x.reshape(-1, self.in_features))
            return x
        self._check_ready()
        mean = self.mean.to(x.dtype)
        if self.keepdim:
            projection = self.transformation_matrix.to(x.dtype)
            if not self._centering_value:
                return x @ projection
            return (x - mean) @ projection + mean
        basis = self.eigenvectors[:, : self._num_kept].to(x.dtype)
        if not self._centering_value:
            return x @ basis
        return (x - mean) @ basis

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, threshold={self._threshold_value}, keepdim={self.keepdim}, "
            f"centering={self._centering_value}"
        )


class Conv2DPCALayer(LinearPCALayer):
    """Project the channels of a 2-D feature map onto their leading eigenspace.

    Every spatial position of every image is a sample of ``in_filters``
    channels, as in the tracker's ``channelwise`` method. In evaluation the
    projection is applied at every position as a 1x1 convolution, so the output
    has the shape of the input.

    Parameters
    ----------
    in_filters : int
        Number of channels of the input ``(batch, in_filters, height, width)``.
    threshold : float
        Share of the variance the kept eigendirections explain, in (0, 1].
    verbose : bool
        Log the saturation each time the projection is computed.
    gradient_epoch_start : int
        Kept for compatibility with delve 0.1.50; it has no effect.
    centering : bool
        Subtract the training mean of each channel before projecting.
    downsampling : int, optional
        In training, feature maps larger than ``downsampling`` are resized
        (nearest neighbour) to at most ``downsampling`` pixels a side before
        they are accumulated, which makes big maps cheaper. The projection is
        always applied at full resolution.

    Examples
    --------
    >>> layer = Conv2DPCALayer(2, verbose=False)
    >>> _ = layer(torch.tensor([[[[1.0, -1.0]], [[2.0, -2.0]]]]))
    >>> _ = layer.eval()
    >>> layer(torch.tensor([[[[5.0]], [[0.0]]]])).flatten().round(decimals=3)
    tensor([1., 2.])
    """

    def __init__(
        self,
        in_filters: int,
        threshold: float = 0.99,
        verbose: bool = True,
        gradient_epoch_start: int = 20,
        centering: bool = False,
        downsampling: Optional[int] = None,
    ) -> None:
        super().__init__(
            in_features=in_filters,
            threshold=threshold,
            keepdim=True,
            verbose=verbose,
            gradient_epoch_start=gradient_epoch_start,
            centering=centering,
        )
        self.downsampling = _check_downsampling(downsampling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Training: accumulate channelwise and return ``x``. Evaluation: project every position."""
        if x.ndim != 4 or x.shape[1] != self.in_features:
            raise ValueError(
                f"Conv2DPCALayer expects input of shape (batch, {self.in_features}, height, width), "
                f"got {tuple(x.shape)}"
            )
        if self.training:
            samples = x
            if self.downsampling is not None:
                size = (min(x.shape[2], self.downsampling), min(x.shape[3], self.downsampling))
                if size != tuple(x.shape[2:]):
                    samples = F.interpolate(x.detach(), size=size, mode="nearest")
            self._accumulate(samples.flatten(2))
            return x
        self._check_ready()
        projection = self.transformation_matrix.to(x.dtype)
        bias = None
        if self._centering_value:
            mean = self.mean.to(x.dtype)
            bias = mean - projection @ mean
        return F.conv2d(x, projection[:, :, None, None], bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, downsampling={self.downsampling}"


def _pca_layers(network: nn.Module) -> List[Tuple[str, LinearPCALayer]]:
    """PCA layers of ``network`` named ``Conv-<i>`` / ``Lin-<i>`` in module order."""
    counts = {"Conv": 0, "Lin": 0}
    found = []
    for module in network.modules():
        if isinstance(module, LinearPCALayer):
            kind = "Conv" if isinstance(module, Conv2DPCALayer) else "Lin"
            found.append((f"{kind}-{counts[kind]}", module))
            counts[kind] += 1
    return found


def change_all_pca_layer_thresholds(
    threshold: float, network: nn.Module, verbose: bool = False
) -> Tuple[List[float], List[int], List[int], List[str]]:
    """Set the threshold of every PCA layer of ``network`` (recomputing computed projections).

    Parameters
    ----------
    threshold : float
        New share of the variance to keep, in (0, 1].
    network : torch.nn.Module
        Model holding :class:`LinearPCALayer` / :class:`Conv2DPCALayer` modules.
    verbose : bool
        Log each change.

    Returns
    -------
    tuple of lists
        ``(sat, in_dims, fs_dims, names)`` per PCA layer: saturation in percent,
        kept directions, feature-space size and a name (``Lin-0``, ``Conv-0``...).

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(3, 3), LinearPCALayer(3))
    >>> change_all_pca_layer_thresholds(0.5, net)
    ([0.0], [0], [3], ['Lin-0'])
    """
    threshold = metrics.check_share("threshold", threshold)
    sat, in_dims, fs_dims, names = [], [], [], []
    for name, module in _pca_layers(network):
        module.threshold = threshold
        sat.append(module.sat)
        in_dims.append(module.in_dim)
        fs_dims.append(module.fs_dim)
        names.append(name)
        if verbose:
            log.info("changed the threshold of %s (%s) to %s", name, module.name, threshold)
    return sat, in_dims, fs_dims, names


def change_all_pca_layer_thresholds_and_inject_random_directions(
    threshold: float,
    network: nn.Module,
    verbose: bool = False,
    device: Union[str, torch.device] = "cpu",
    include_names: bool = False,
) -> Union[Tuple[list, list, list], Tuple[list, list, list, list]]:
    """Set the threshold of every PCA layer, then swap its eigenvectors for random ones.

    Each layer keeps as many directions as its real eigenspace at ``threshold``
    would, but they are drawn at random (:func:`rvs`). Comparing a network's
    accuracy under both projections shows how much the real eigenspace matters.
    The next training phase computes real eigenvectors again.

    Parameters
    ----------
    threshold : float
        New share of the variance to keep, in (0, 1].
    network : torch.nn.Module
        Model holding PCA layers whose projections were computed.
    verbose : bool
        Log each change.
    device : str or torch.device
        Kept for compatibility with delve 0.1.50; the random projection is
        always placed on the layer's own device.
    include_names : bool
        Also return the layer names.

    Returns
    -------
    tuple of lists
        ``(sat, in_dims, fs_dims)``, plus ``names`` when ``include_names``.
    """
    sat, in_dims, fs_dims, names = change_all_pca_layer_thresholds(threshold, network, verbose=False)
    for name, module in _pca_layers(network):
        if not module.in_dim:
            raise RuntimeError(
                f"PCA layer {name} has no projection yet: train the network before injecting random directions"
            )
        random_basis = torch.from_numpy(rvs(module.fs_dim))
        module.eigenvectors.copy_(random_basis)
        module._set_projection(random_basis[:, : module.in_dim].to(module.eigenvectors.device))
        if verbose:
            log.info("injected %d random directions into %s (%s)", module.in_dim, name, module.name)
    if include_names:
        return sat, in_dims, fs_dims, names
    return sat, in_dims, fs_dims


def change_all_pca_layer_centering(
    centering: bool, network: nn.Module, verbose: bool = False, downsampling: Optional[int] = None
) -> None:
    """Switch centering on or off in every PCA layer of ``network`` (refitting computed ones).

    Parameters
    ----------
    centering : bool
        Whether the layers subtract the training mean before projecting.
    network : torch.nn.Module
        Model holding PCA layers.
    verbose : bool
        Log each change.
    downsampling : int, optional
        When given, also the new ``downsampling`` of every :class:`Conv2DPCALayer`;
        ``None`` leaves it as it is.
    """
    downsampling = _check_downsampling(downsampling)
    for name, module in _pca_layers(network):
        module.centering = centering
        if downsampling is not None and isinstance(module, Conv2DPCALayer):
            module.downsampling = downsampling
        if verbose:
            log.info("set centering=%s for %s (%s)", centering, name, module.name)
