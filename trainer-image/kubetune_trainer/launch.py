"""torchrun, with the training process's exit code as the pod's exit code.

Training pods run ``python -m kubetune_trainer.launch <torchrun arguments>``. Plain torchrun
exits 1 whatever its workers exited with, which would hide the codes the operator acts on
(2 bad configuration, 3 bad data, 4 unsupported hardware: not retried; 143 preempted after a
checkpoint). This runs torchrun's own launcher and exits with the first failed worker's code.
"""

from __future__ import annotations

import signal
import sys


def exit_code(worker_exitcode: int) -> int:
    """A worker killed by signal N (negative exitcode) exits 128 + N, as a shell would report it."""
    return 128 - worker_exitcode if worker_exitcode < 0 else worker_exitcode


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        print(e.format_msg(), file=sys.stderr)  # torchrun's own summary of who failed
        return exit_code(failure.exitcode) or 1
    except SignalException as e:  # the pod was told to stop: the workers got the signal too
        return 128 + int(e.sigval if isinstance(e.sigval, int) else signal.SIGTERM)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
