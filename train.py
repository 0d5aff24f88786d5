"""python train.py CONFIG.yml [key=value ...]  -- train an OpenVision encoder (see README.md)."""

import sys

from openvision_max.training.main import main

if __name__ == "__main__":
    main(sys.argv[1:])
