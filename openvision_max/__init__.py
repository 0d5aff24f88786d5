"""openvision-max: train OpenVision-style vision encoders with JAX, the MaxText way."""

__version__ = "0.1.0"
