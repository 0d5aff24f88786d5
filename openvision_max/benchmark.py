"""`python -m openvision_max.benchmark CONFIG [key=value ...] [options]`: the short name of
`openvision_max.perf.benchmark` (MFU sweeps, modelled on TPU topologies or measured here)."""

import sys

from openvision_max.perf.benchmark import main

if __name__ == "__main__":
    main(sys.argv[1:])
