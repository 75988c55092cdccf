"""Entry point of ``python -m cp_dtensor.training`` and ``torchrun ... -m cp_dtensor.training``."""

import sys

from cp_dtensor.training.train import main

sys.exit(main())
