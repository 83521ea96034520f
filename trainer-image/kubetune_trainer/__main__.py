"""``python -m kubetune_trainer ...`` (what torchrun runs in training pods)."""

import sys

from kubetune_trainer.cli import main

sys.exit(main())
