"""The OpenVision model family: `build(cfg)` returns the Flax module a config describes."""

from openvision_max.models.openvision import OpenVision, build, dummy_inputs, l2_normalize

__all__ = ["OpenVision", "build", "dummy_inputs", "l2_normalize"]
