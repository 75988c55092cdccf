"""Moved to :mod:`cp_dtensor.training` (run ``-m cp_dtensor.training``); this alias goes in the next release."""

import sys
import warnings

if __name__ == "__main__":  # python -m cp_dtensor.train / torchrun ... -m cp_dtensor.train
    from cp_dtensor.training.train import main

    warnings.warn(
        "-m cp_dtensor.train moved to -m cp_dtensor.training (the old name goes in the next release).",
        FutureWarning,
        stacklevel=1,
    )
    sys.exit(main())
else:
    from cp_dtensor._moved import alias

    alias(__name__)
