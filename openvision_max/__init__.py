"""openvision-max: train OpenVision-style vision encoders with JAX, the MaxText way."""

__version__ = "0.1.0"

# libtpu (installed for AOT compilation) otherwise queries TPU metadata and prints errors on hosts without TPUs,
# whenever JAX starts its backends. This only sets unset variables, and nothing where TPUs may be present.
from openvision_max.config.topology import libtpu_env_for_cpu_host as _libtpu_env  # noqa: E402

_libtpu_env()


def __getattr__(name: str):
    # `load_model` pulls in JAX and Flax: imported on first use, so `import openvision_max` stays light.
    if name == "load_model":
        from openvision_max.api import load_model
        return load_model
    raise AttributeError(f"module 'openvision_max' has no attribute {name!r}")
