"""openvision-max: train OpenVision-style vision encoders with JAX, the MaxText way."""

__version__ = "0.1.0"

# libtpu (installed for AOT compilation) otherwise queries TPU metadata and prints errors on hosts without TPUs,
# whenever JAX starts its backends. This only sets unset variables, and nothing where TPUs may be present.
from openvision_max.topology import libtpu_env_for_cpu_host as _libtpu_env  # noqa: E402

_libtpu_env()
