"""Import path of delve 0.1.50 for the accumulator; the code lives in :mod:`delve.covariance`."""
from delve.covariance import TorchCovarianceMatrix

__all__ = ["TorchCovarianceMatrix"]
