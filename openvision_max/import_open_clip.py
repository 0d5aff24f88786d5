"""`python -m openvision_max.import_open_clip DIR CONFIG ... output=RUN`: the short name of
`openvision_max.export.import_open_clip`."""

import sys

from openvision_max.export.import_open_clip import main

if __name__ == "__main__":
    main(sys.argv[1:])
