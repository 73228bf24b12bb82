"""Import path of delve 0.1.50 for the tracker and what its module exposed; the code lives elsewhere.

``from delve.torchcallback import SaturationTracker, TorchCovarianceMatrix, STATMAP, WRITERS,
CompositWriter, NPYWriter, compute_saturation`` keeps working (and so does ``import *``,
which gives every public name, as in 0.1.50).
"""
from typing import Any

# Re-exported as 0.1.50's module exposed them.
from delve.covariance import TorchCovarianceMatrix  # noqa: F401
from delve.logger import log  # noqa: F401
from delve.metrics import (  # noqa: F401
    compute_cov_determinant,
    compute_cov_trace,
    compute_diag_trace,
    compute_intrinsic_dimensionality,
    compute_saturation,
)
from delve.tracker import CheckLayerSat, SaturationTracker  # noqa: F401
from delve.writers import STATMAP, WRITERS, CompositWriter  # noqa: F401


def __getattr__(name: str) -> Any:
    # The writer classes of 0.1.50 (NPYWriter, ...) load on first use, as in delve.writers.
    import delve.writers

    return getattr(delve.writers, name)
