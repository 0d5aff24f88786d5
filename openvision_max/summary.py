"""`python -m openvision_max.summary CONFIG [key=value ...]`: the short name of `openvision_max.perf.summary`."""

import sys

from openvision_max.perf.summary import main

if __name__ == "__main__":
    main(sys.argv[1:])
