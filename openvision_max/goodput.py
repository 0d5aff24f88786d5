"""`python -m openvision_max.goodput RUN_DIR [--json]`: productive against lost time of a run directory, from its
own records (the short name of `openvision_max.observe.goodput`)."""

import sys

from openvision_max.observe.goodput import main

if __name__ == "__main__":
    main(sys.argv[1:])
