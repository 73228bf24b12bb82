"""Keras 3 callbacks: layer saturation of Keras models, computed by delve.

Three callbacks, all computing saturation with :mod:`delve.covariance` and
:mod:`delve.metrics` exactly as :class:`~delve.SaturationTracker` does for
PyTorch models (Dense outputs: every position of the leading axes is a sample;
convolutions: ``channelwise`` by default, every spatial position a sample of
the channels):

* :class:`SaturationLogger` prints ``dense  : %0.83 | dense_1  : %0.79 |``
  every ``print_freq`` epochs, from a fixed ``input_data`` run through the model.
* :class:`SaturationCallback` (the Keras counterpart of the ``SaturationCallback``
  of :mod:`delve.integrations.lightning`) runs a full :class:`~delve.SaturationTracker`
  over the training (and validation) batches themselves and writes through any
  delve writer, with the CSV columns of the PyTorch side
  (``train-saturation_<layer>``, ``eval-saturation_<layer>``).
* :class:`CustomTensorBoard` is that tracker callback writing TensorBoard
  scalars every ``user_defined_freq`` epochs, with the epoch as step.

Backends
--------
:class:`SaturationLogger` uses only backend-neutral Keras API (a
feature-extraction model whose ``predict_on_batch`` returns numpy arrays, fed
to delve's torch accumulator), so it also runs on the jax and tensorflow
backends; delve's tests exercise it on torch. :class:`SaturationCallback`
and :class:`CustomTensorBoard` need ``KERAS_BACKEND=torch``: there Keras layers
are :class:`torch.nn.Module` instances, so delve's forward hooks see every
batch; on another backend they raise a RuntimeError saying so.

Keras picks its backend when it is first imported. When this module is
imported before Keras, with ``KERAS_BACKEND`` unset and TensorFlow not
installed (so Keras' default backend could not load), it sets
``KERAS_BACKEND=torch``; otherwise the user's choice stands.

Layers tracked: ``Dense`` and the convolutions (``Conv1D/2D/3D``, their
``Transpose`` forms, ``SeparableConv1D/2D``, ``DepthwiseConv1D/2D``), named as
Keras names them; a layer of a nested model is named ``<model>-<layer>``.
"""
from __future__ import annotations

import importlib.util
import inspect
from collections import OrderedDict
from typing import Any, Dict, Mapping, Optional

import numpy as np
from torch import nn

from delve import metrics
from delve.adapters import AdapterOptions
from delve.integrations import announce_continuation, scalar_results
from delve.keras_layers import (  # picks Keras' backend before Keras is imported
    FixedInputSaturation,
    is_torch_backend,
    keras_layers,
    keras_samples,
    require_torch_backend,
)
from delve.tracker import SaturationTracker
from delve.writers import SaveTo, check_save_to
from delve.writers.print import PrintWriter

import keras  # noqa: E402,I001  (after delve.keras_layers chose the backend)

def _check_positive_int(parameter: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{parameter} must be an int >= 1, got {value!r}")


def format_saturations(saturations: Mapping[str, float]) -> str:
    """One line in the format of delve's Keras logger: ``name  : %0.83 | ...``.

    Examples
    --------
    >>> format_saturations({"dense_1": 0.83, "dense_2": 0.7890})
    'dense_1  : %0.83 | dense_2  : %0.79 |'
    """
    return " ".join(f"{name}  : %{value:.2f} |" for name, value in saturations.items())


class SaturationLogger(keras.callbacks.Callback):
    """Print the saturation of every Dense and convolution layer for a fixed input.

    Every ``print_freq`` epochs (epochs ``0, print_freq, 2 * print_freq``...),
    ``input_data`` is run through the model in inference mode, each layer's
    outputs go into a :class:`~delve.TorchCovarianceMatrix` and the saturation
    comes from :func:`delve.metrics.compute_saturation`, exactly as for PyTorch
    layers. One line per epoch is printed: ``dense  : %0.83 | dense_1  : %0.79 |``.
    Backend-neutral (see the module notes); works for Sequential and functional
    models (the layers of the model itself, not those of nested models).

    Parameters
    ----------
    model : keras.Model
        The model being trained.
    input_data : array or list/dict of arrays
        Data passed through the model (its first axis are the samples).
    print_freq : int
        Compute and print every ``print_freq`` epochs.
    sat_threshold : float
        Share of the variance the kept eigendirections explain, in (0, 1].
    conv_method : str
        How a convolution's output becomes samples, as in
        :class:`~delve.SaturationTracker` (``channelwise`` by default).
    include_conv : bool
        ``False`` leaves the convolutions out.
    batch_size : int
        Rows of ``input_data`` run through the model at once.
    verbose : bool
        ``False`` keeps the values without printing them.

    Attributes
    ----------
    saturations : dict
        Layer name to saturation of the last computed epoch.
    history : dict
        Epoch to such a dict, for every computed epoch.

    Examples
    --------
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="hidden")])
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> x = np.eye(4, dtype="float32")
    >>> logger = SaturationLogger(model, input_data=x, print_freq=1)
    >>> _ = model.fit(x, np.zeros((4, 3)), epochs=1, verbose=0, callbacks=[logger])  # doctest: +ELLIPSIS
    hidden  : %... |
    >>> sorted(logger.saturations)
    ['hidden']
    """

    def __init__(
        self,
        model: "keras.Model",
        input_data: Any,
        print_freq: int = 1,
        sat_threshold: float = 0.99,
        conv_method: str = "channelwise",
        include_conv: bool = True,
        batch_size: int = 256,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(model, keras.Model):
            raise ValueError(f"model must be a keras.Model, got {type(model).__name__}")
        if input_data is None:
            raise ValueError("input_data must be the data to pass through the model, got None")
        _check_positive_int("print_freq", print_freq)
        _check_positive_int("batch_size", batch_size)
        metrics.check_share("sat_threshold", sat_threshold)
        options = AdapterOptions(conv_method=conv_method)
        layers = keras_layers(model, include_conv=include_conv, nested=False)
        if not layers:
            raise ValueError("model has no Dense or convolution layer to log (include_conv=False leaves out convs)")
        self.set_model(model)
        self.input_data = input_data
        self.print_freq = print_freq
        self.verbose = verbose
        self.saturations: Dict[str, float] = {}
        self.history: Dict[int, Dict[str, float]] = {}
        self._compute = FixedInputSaturation(layers, options, float(sat_threshold), batch_size)

    @property
    def layers(self) -> "OrderedDict[str, Any]":
        """Layer name to Keras layer, for the layers logged."""
        return self._compute.layers

    def compute(self) -> Dict[str, float]:
        """Saturation of every logged layer for ``input_data`` with the current weights."""
        return dict(self._compute(self.model, self.input_data))

    def on_epoch_end(self, epoch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        """Compute, keep and print the saturations every ``print_freq`` epochs."""
        if epoch % self.print_freq:
            return
        self.saturations = self.compute()
        self.history[epoch] = dict(self.saturations)
        if self.verbose:
            print(format_saturations(self.saturations))


#: SaturationTracker arguments the callback sets itself.
_CHOSEN_BY_CALLBACK = ("savefile", "save_to", "modules", "writer_args", "layer_filter")


def _validated_tracker_args(tracker_args: Mapping[str, Any]) -> Dict[str, Any]:
    """Check the SaturationTracker options now, so a typo fails before training starts."""
    names = list(inspect.signature(SaturationTracker.__init__).parameters)[1:]
    allowed = [name for name in names if name not in _CHOSEN_BY_CALLBACK]
    for key in tracker_args:
        if key in _CHOSEN_BY_CALLBACK:
            raise ValueError(
                f"{key!r} is set by the callback, which tracks the model's Dense and convolution layers; "
                "leave it out (ignore_layer_names and include_conv narrow the layers)"
            )
        if key not in allowed:
            raise ValueError(f"{key!r} is not an option of SaturationTracker; choose from {', '.join(allowed)}")
    probe = SaturationTracker("", save_to=PrintWriter(), modules=nn.Linear(1, 1), **{**tracker_args, "nosave": True})
    probe.close()
    return dict(tracker_args)


class SaturationCallback(keras.callbacks.Callback):
    """Run delve's :class:`~delve.SaturationTracker` over the batches Keras trains on.

    On the torch backend Keras layers are :class:`torch.nn.Module` instances, so
    the tracker's forward hooks see the outputs of every training batch
    (recorded as ``train``) and every validation batch (recorded as ``eval``).
    At the end of each ``freq``-th epoch the statistics go to the writers, with
    the names and CSV columns of the PyTorch side, so Keras and PyTorch runs can
    be read and plotted together. Every writer numbers the row by the epoch
    (CSV index, TensorBoard step, npy file), so ``freq=2`` writes epochs 0, 2,
    4... With ``log_to_trainer`` the scalar statistics are also added to the
    epoch's Keras ``logs``, where the callbacks after this one see them:
    ``History`` (``model.fit(...).history``), ``EarlyStopping`` and
    ``ModelCheckpoint`` (``monitor="eval-saturation_<layer>"``), ``CSVLogger``,
    Keras' ``TensorBoard`` and the progress bar (put this callback before the
    ones that monitor its values). Forward passes outside ``fit`` batches (a
    :class:`SaturationLogger`, ``predict``) are not recorded. Needs
    ``KERAS_BACKEND=torch`` and eager execution: ``fit`` raises a ValueError
    for a model compiled with ``jit_compile=True`` (the torch backend's
    default is ``False``).

    Parameters
    ----------
    savefile : str
        Path of the run, as for :class:`~delve.SaturationTracker` (the CSV is
        ``savefile + '.csv'``).
    save_to : str, AbstractWriter or list of them
        Writer key(s) of :data:`delve.writers.WRITERS` or writer instances.
    freq : int
        Record and write every ``freq`` epochs (epochs ``0, freq, 2 * freq``...).
    log_metrics : bool
        Also write Keras' epoch logs (``loss``, ``val_loss``, metrics) in the same row.
    log_to_trainer : bool
        Also add the statistics to Keras' epoch ``logs``.
    writer_args : dict, optional
        Keyword arguments for the writers built from keys.
    **tracker_args
        Other options of :class:`~delve.SaturationTracker` (``stats``,
        ``conv_method``, ``sat_threshold``, ``max_samples``, ``include_conv``,
        ``average_sat``, ``ignore_layer_names``...). ``initial_epoch`` numbers
        the first epoch of the first ``fit``.

    Attributes
    ----------
    tracker : SaturationTracker or None
        The tracker while ``fit`` runs.
    history : dict
        Epoch to the statistics written for it, over every ``fit`` of this callback.

    Notes
    -----
    The first ``fit`` of a callback starts a new run at epoch 0: by the
    tracker's rule, an earlier run in ``savefile`` is moved aside (the tracker
    says so). ``fit(initial_epoch=E)`` continues the run at epoch ``E``,
    keeping the rows before it, and a later ``fit`` of the same callback
    without ``initial_epoch`` continues after the last epoch it saw (a second
    ``model.fit`` trains the same model on); the callback says so in both
    cases. Create a new callback for a new run.

    Examples
    --------
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="hidden")])
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> callback = SaturationCallback("runs/doc_keras", save_to="csv", nosave=True)
    >>> fitted = model.fit(np.eye(4), np.zeros((4, 3)), epochs=1, verbose=0, callbacks=[callback])
    >>> sorted(callback.history[0])
    ['loss', 'train-saturation_hidden']
    >>> fitted.history["train-saturation_hidden"] == [callback.history[0]["train-saturation_hidden"]]
    True
    """

    def __init__(
        self,
        savefile: str,
        save_to: SaveTo = "csv",
        freq: int = 1,
        log_metrics: bool = True,
        writer_args: Optional[Dict[str, Any]] = None,
        log_to_trainer: bool = True,
        **tracker_args: Any,
    ) -> None:
        super().__init__()
        require_torch_backend(type(self).__name__)
        check_save_to(save_to)
        _check_positive_int("freq", freq)
        self.savefile = savefile
        self.save_to = save_to
        self.freq = freq
        self.log_metrics = log_metrics
        self.log_to_trainer = log_to_trainer
        self.writer_args = dict(writer_args or {})
        self.tracker_args = _validated_tracker_args(tracker_args)
        self.tracker: Optional[SaturationTracker] = None
        self.history: Dict[int, Dict[str, Any]] = {}
        #: Epoch of the run after the last one a ``fit`` of this callback went through (0: none yet).
        self._next_epoch = 0
        #: Run epoch minus Keras' epoch in the current ``fit``.
        self._offset = 0
        self._fit_started = False
        self._logging_epoch = False
        self._training_flags: Dict[str, bool] = {}

    # ------------------------------------------------------------ lifecycle
    def _build_tracker(self, initial_epoch: int) -> SaturationTracker:
        layers = keras_layers(self.model, include_conv=self.tracker_args.get("include_conv", True))
        if not layers:
            raise ValueError("the model has no Dense or convolution layer for delve to track")
        container = nn.Module()
        for name, layer in layers.items():
            # Keras names may contain dots or shadow Module attributes, which add_module rejects.
            container._modules[name] = layer
        self._training_flags = {name: layer.training for name, layer in layers.items()}
        args = {**self.tracker_args, "initial_epoch": initial_epoch}
        tracker = SaturationTracker(
            self.savefile, save_to=self.save_to, modules=container, writer_args=self.writer_args, **args
        )
        tracker.stop()
        return tracker

    def _start(self, keras_epoch: int) -> None:
        """Start this ``fit``'s tracker at its first epoch: a new run or the continuation of one."""
        if keras_epoch > 0:  # fit(initial_epoch=E): Keras numbers the epochs
            self._offset = self.tracker_args.get("initial_epoch", 0)
            reason = f"the run at fit's initial_epoch={keras_epoch}"
        elif self._next_epoch > 0:  # a later fit of this callback trains the same model on
            self._offset = self._next_epoch
            reason = "the run of this callback's previous fit"
        else:
            self._offset = self.tracker_args.get("initial_epoch", 0)
            reason = ""
        first = self._offset + keras_epoch
        if reason:
            announce_continuation(self.savefile, first, reason)
        self.tracker = self._build_tracker(first)

    def _set_training(self, training: bool) -> None:
        for layer in self.tracker.layers.values():
            layer.training = training

    def on_train_begin(self, logs: Optional[Dict[str, Any]] = None) -> None:
        """Check the backend and the model; the tracker starts with the first epoch."""
        require_torch_backend(type(self).__name__)
        if getattr(self.model, "jit_compile", False):
            raise ValueError(
                f"{type(self).__name__} cannot see the batches of a model compiled with jit_compile=True "
                "(torch.compile skips delve's forward hooks); compile it with jit_compile=False"
            )
        self._fit_started = True

    def on_epoch_begin(self, epoch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        """Start the tracker at the first epoch of a ``fit``; decide whether this epoch is recorded."""
        if self._fit_started and self.tracker is None:
            self._start(epoch)
        self._logging_epoch = self.tracker is not None and (self._offset + epoch) % self.freq == 0
        if self.tracker is not None:
            self._set_training(True)
    def on_train_batch_begin(self, batch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        """Record this batch's forward pass (in a recorded epoch)."""
        if self._logging_epoch:
            self.tracker.resume()

    def on_train_batch_end(self, batch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        """Stop recording until the next batch."""
        if self.tracker is not None:
            self.tracker.stop()

    def on_test_begin(self, logs: Optional[Dict[str, Any]] = None) -> None:
        """Validation batches are recorded as ``eval``."""
        if self.tracker is not None:
            self._set_training(False)

    def on_test_batch_begin(self, batch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        """Record this validation batch (in a recorded epoch)."""
        if self._logging_epoch:
            self.tracker.resume()

    def on_test_batch_end(self, batch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        """Stop recording until the next batch."""
        if self.tracker is not None:
            self.tracker.stop()

    def on_test_end(self, logs: Optional[Dict[str, Any]] = None) -> None:
        """Back to ``train`` for the next epoch's batches."""
        if self.tracker is not None:
            self._set_training(True)

    def on_epoch_end(self, epoch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        """Write this epoch's statistics (and Keras' logs) with the run's epoch as step; add them to ``logs``."""
        run_epoch = self._offset + epoch
        if self.tracker is not None:
            self._next_epoch = run_epoch + 1
        if not self._logging_epoch:
            return
        self._logging_epoch = False
        tracker = self.tracker
        tracker.epoch = run_epoch
        written: Dict[str, Any] = {}
        if self.log_metrics and logs:
            scalars = {name: float(value) for name, value in logs.items() if np.ndim(value) == 0}
            tracker.add_scalars("", scalars)
            written.update(scalars)
        results = tracker.add_saturations()
        written.update(results)
        self.history[run_epoch] = written
        if self.log_to_trainer and logs is not None:
            logs.update((name, value) for name, value in scalar_results(results, "").items() if not np.isnan(value))

    def on_train_end(self, logs: Optional[Dict[str, Any]] = None) -> None:
        """Remove the hooks and close the writers; a later ``fit`` continues the run."""
        self._fit_started = False
        self.close()
    def close(self) -> None:
        """Remove the hooks, restore the layers' training flags and close the writers."""
        if self.tracker is None:
            return
        for name, layer in self.tracker.layers.items():
            layer.training = self._training_flags.get(name, True)
        self.tracker.close()
        self.tracker = None


def _tensorflow_available() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _forwarding(hook: str) -> Any:
    """A CustomTensorBoard hook: delve's, then that of Keras' TensorBoard callback when kwargs made one."""
    delve_hook = getattr(SaturationCallback, hook)

    def forward(self: "CustomTensorBoard", *args: Any, **kwargs: Any) -> None:
        delve_hook(self, *args, **kwargs)
        if self.keras_tensorboard is not None:
            getattr(self.keras_tensorboard, hook)(*args, **kwargs)

    forward.__name__ = forward.__qualname__ = hook
    forward.__doc__ = f"{delve_hook.__doc__} Then Keras' TensorBoard callback's ``{hook}``, if kwargs made one."
    return forward


class CustomTensorBoard(SaturationCallback):
    """Write the saturation of every Dense and convolution layer as TensorBoard scalars.

    Every ``user_defined_freq`` epochs the layers' saturation over that epoch's
    training batches (``train-saturation_<layer>``) and validation batches
    (``eval-saturation_<layer>``) is written through delve's ``tensorboard``
    writer into ``log_dir``, with the epoch as step; Keras' epoch logs
    (``loss``, ``val_loss``, metrics) are written beside them. It is a
    :class:`SaturationCallback` with ``save_to='tensorboard'``, so it
    needs ``KERAS_BACKEND=torch``.

    Parameters
    ----------
    log_dir : str
        Folder of the TensorBoard event files.
    user_defined_freq : int
        Write every ``user_defined_freq`` epochs.
    sat_threshold : float
        Share of the variance the kept eigendirections explain, in (0, 1].
    conv_method : str
        How a convolution's output becomes samples (``channelwise`` by default).
    include_conv : bool
        ``False`` leaves the convolutions out.
    log_metrics : bool
        Also write Keras' epoch logs.
    **kwargs
        As in delve 0.1.50, passed to :class:`keras.callbacks.TensorBoard`
        (``histogram_freq``, ``write_graph``, ``update_freq``...), which then
        runs beside this callback on the same ``log_dir``. Keras' TensorBoard
        callback writes through TensorFlow, so kwargs need ``tensorflow``
        installed; without kwargs no TensorFlow is needed.

    Examples
    --------
    ``model.fit(x, y, epochs=10, callbacks=[CustomTensorBoard("runs/keras", user_defined_freq=1)])``
    then ``tensorboard --logdir runs/keras``.
    """

    def __init__(
        self,
        log_dir: str,
        user_defined_freq: int = 1,
        sat_threshold: float = 0.99,
        conv_method: str = "channelwise",
        include_conv: bool = True,
        log_metrics: bool = True,
        **kwargs: Any,
    ) -> None:
        _check_positive_int("user_defined_freq", user_defined_freq)
        self.keras_tensorboard: Optional[keras.callbacks.Callback] = None
        if kwargs:
            if not _tensorflow_available():
                raise ImportError(
                    f"CustomTensorBoard passes {', '.join(sorted(kwargs))} to keras.callbacks.TensorBoard, which "
                    "writes through TensorFlow: pip install tensorflow, or leave these arguments out"
                )
            self.keras_tensorboard = keras.callbacks.TensorBoard(log_dir=log_dir, **kwargs)
        super().__init__(
            log_dir,
            save_to="tensorboard",
            freq=user_defined_freq,
            log_metrics=log_metrics,
            sat_threshold=sat_threshold,
            conv_method=conv_method,
            include_conv=include_conv,
        )
        self.log_dir = log_dir
        self.user_defined_freq = user_defined_freq

    def set_model(self, model: "keras.Model") -> None:
        """Keras hands over the model; Keras' TensorBoard callback gets it too."""
        super().set_model(model)
        if self.keras_tensorboard is not None:
            self.keras_tensorboard.set_model(model)

    def set_params(self, params: Dict[str, Any]) -> None:
        """Keras hands over the fit parameters; Keras' TensorBoard callback gets them too."""
        super().set_params(params)
        if self.keras_tensorboard is not None:
            self.keras_tensorboard.set_params(params)

    on_train_begin = _forwarding("on_train_begin")
    on_train_end = _forwarding("on_train_end")
    on_epoch_begin = _forwarding("on_epoch_begin")
    on_epoch_end = _forwarding("on_epoch_end")
    on_train_batch_begin = _forwarding("on_train_batch_begin")
    on_train_batch_end = _forwarding("on_train_batch_end")
    on_test_begin = _forwarding("on_test_begin")
    on_test_end = _forwarding("on_test_end")
    on_test_batch_begin = _forwarding("on_test_batch_begin")
    on_test_batch_end = _forwarding("on_test_batch_end")


__all__ = [
    "CustomTensorBoard",
    "SaturationLogger",
    "SaturationCallback",
    "format_saturations",
    "is_torch_backend",
    "keras_layers",
    "keras_samples",
]
