"""Keras 3 on the torch backend: layer saturation of a small CNN learning scikit-learn's digits.

Needs Keras 3 (``pip install delve[keras]``; no TensorFlow). Run
``python examples/keras_saturation.py`` (``--quick`` for a two-epoch smoke run).
Three delve callbacks go into ``model.fit``:

* ``SaturationLogger`` prints ``conv  : %0.41 | hidden  : %0.62 | output  : %0.80 |``
  after each epoch, for a fixed batch of test images;
* ``SaturationCallback`` tracks every training and validation batch and
  writes ``runs/keras_saturation.csv``, with the columns of a PyTorch run
  (``train-saturation_conv``, ``eval-saturation_hidden``...) plus Keras' loss
  and accuracy; the same values go into Keras' epoch logs, so the progress
  line and the ``History`` that ``fit`` returns hold them too;
* ``CustomTensorBoard`` writes the same saturations as TensorBoard scalars to
  ``runs/keras_saturation_tb`` (``tensorboard --logdir runs``).
"""
import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # before Keras is imported

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from delve.kerascallback import CustomTensorBoard, SaturationLogger, SaturationCallback  # noqa: E402


def digits(limit: int = 0) -> tuple:
    """8x8 digit images (channels last, scaled to [0, 1]) and labels, split 1400 / rest."""
    data = load_digits()
    images = (data.images[..., None] / 16.0).astype("float32")
    order = np.random.default_rng(0).permutation(len(images))
    train, test = order[:1400], order[1400:]
    if limit:
        train, test = train[:limit], test[: limit // 2]
    return images[train], data.target[train], images[test], data.target[test]


def small_cnn() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu", name="hidden"),
            keras.layers.Dense(10, activation="softmax", name="output"),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="two epochs on 256 images, for smoke tests")
    args = parser.parse_args()
    epochs = 2 if args.quick else args.epochs

    keras.utils.set_random_seed(0)
    x_train, y_train, x_test, y_test = digits(limit=256 if args.quick else 0)
    model = small_cnn()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])

    callbacks = [
        SaturationLogger(model, input_data=x_test[:200], print_freq=1),
        SaturationCallback("runs/keras_saturation", save_to="csv", stats=["lsat", "idim"]),
        CustomTensorBoard(log_dir="runs/keras_saturation_tb", user_defined_freq=1),
    ]
    history = model.fit(
        x_train,
        y_train,
        epochs=epochs,
        batch_size=64,
        validation_data=(x_test, y_test),
        verbose=2,
        callbacks=callbacks,
    )
    print("saturation per layer, last epoch:", callbacks[0].saturations)
    print("History, eval saturation of 'hidden' per epoch:", history.history["eval-saturation_hidden"])
    print("written: runs/keras_saturation.csv and runs/keras_saturation_tb/")


if __name__ == "__main__":
    main()
