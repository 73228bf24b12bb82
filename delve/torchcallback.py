"""Import path of delve 0.1.50 for the tracker; the code lives in :mod:`delve.tracker`."""
from delve.tracker import CheckLayerSat, SaturationTracker

__all__ = ["SaturationTracker", "CheckLayerSat"]
