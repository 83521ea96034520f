"""``python -m kubetune_trainer.kernels``: build the CPU kernels now (the trainer image does, when built).

The kernels are x86-64 code (AVX-512 and AMX); elsewhere there is nothing to build and training
keeps torch's kernels. On x86-64 a failed build is an error, so an image never ships without them
by accident.
"""

from __future__ import annotations

import platform
import sys

from kubetune_trainer.kernels import build


def main() -> int:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        print(f"kubetune CPU kernels: nothing to build on {platform.machine()}")
        return 0
    print(build(load=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
