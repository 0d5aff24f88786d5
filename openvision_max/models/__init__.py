"""The OpenVision model family: `build(cfg)` returns the Flax module a config describes (by `objective`)."""

from openvision_max.models import openvision, openvision2
from openvision_max.models.openvision import OpenVision, l2_normalize
from openvision_max.models.openvision2 import OpenVision2

_BUILD = {"openvision": openvision.build, "openvision2": openvision2.build}
_DUMMY_INPUTS = {"openvision": openvision.dummy_inputs, "openvision2": openvision2.dummy_inputs}


def build(cfg):
    """The module of `cfg.objective`: OpenVision (three towers) or OpenVision2 (vision + caption LM)."""
    return _BUILD[cfg.objective](cfg)


def dummy_inputs(cfg, batch: int = 1):
    """Abstract arguments of the model's `init` for a batch of `batch`."""
    return _DUMMY_INPUTS[cfg.objective](cfg, batch)


__all__ = ["OpenVision", "OpenVision2", "build", "dummy_inputs", "l2_normalize"]
