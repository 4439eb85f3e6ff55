"""Models: locally connected layer, LCGAN/SGAN, recogniser, calibration, SVM metrics, registry.

Importing this package registers the custom layers with Keras' serialisation so
saved ``model.keras`` files load.  Submodules are imported lazily where heavy.
"""
from __future__ import annotations

from .layers import ChannelAttention1D, LocallyConnected1D, lc_output_length

__all__ = ["LocallyConnected1D", "ChannelAttention1D", "lc_output_length"]
