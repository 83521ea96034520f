"""``python -m kubetune_trainer.serve serve|fetch ...`` (the same commands as ``kubetune serve|fetch``)."""

import sys

from kubetune_trainer.serve.cli import main

sys.exit(main())
