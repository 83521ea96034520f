"""torchrun, with the training process's exit code as the pod's exit code.

Training pods run ``python -m kubetune_trainer.launch <torchrun arguments>``. Plain torchrun
exits 1 whatever its workers exited with, which would hide the codes the operator acts on
(2 bad configuration, 3 bad data, 4 unsupported hardware: not retried; 143 preempted after a
checkpoint). This runs torchrun's own launcher and exits with the first failed worker's code.

On SIGTERM (pod deletion, preemption, a suspended Job) torchrun forwards the signal to its
workers and SIGKILLs those still running after a shutdown timeout, 30 s by default: too short
for saving and uploading a checkpoint. The operator puts the pod's
terminationGracePeriodSeconds in ``KUBETUNE_TERMINATION_GRACE_SECONDS``; the workers get that
much time, less a margin for the agent's own exit (``shutdown_timeout``).
``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` or torchrun's ``--shutdown-timeout``, when given, win.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import sys
from collections.abc import MutableMapping

GRACE_ENV = "KUBETUNE_TERMINATION_GRACE_SECONDS"
TORCH_SHUTDOWN_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
MAX_MARGIN_SECONDS = 10


def exit_code(worker_exitcode: int) -> int:
    """A worker killed by signal N (negative exitcode) exits 128 + N, as a shell would report it."""
    return 128 - worker_exitcode if worker_exitcode < 0 else worker_exitcode


def shutdown_timeout(grace_seconds: int) -> int:
    """Seconds the workers get after SIGTERM: the grace period less 10 s (a tenth of a short one)
    for the agent to exit before the kubelet's SIGKILL."""
    return max(1, grace_seconds - min(MAX_MARGIN_SECONDS, grace_seconds // 10))


def configured_shutdown_timeout(env: MutableMapping[str, str]) -> int | None:
    """TORCH_ELASTIC_SHUTDOWN_TIMEOUT if set, else one derived from the pod's grace period."""
    for name, derive in ((TORCH_SHUTDOWN_ENV, int), (GRACE_ENV, shutdown_timeout)):
        value = env.get(name, "").strip()
        if not value:
            continue
        try:
            seconds = int(value)
        except ValueError:
            print(
                f"kubetune launch: ignoring {name}={value!r} (not a whole number of seconds)", file=sys.stderr
            )
            continue
        if seconds >= 0:
            return derive(seconds)
    return None


def _torch_has_shutdown_timeout() -> bool:
    """torchrun's --shutdown-timeout / TORCH_ELASTIC_SHUTDOWN_TIMEOUT (newer torch releases)."""
    from torch.distributed.launcher.api import LaunchConfig

    return any(f.name == "shutdown_timeout" for f in dataclasses.fields(LaunchConfig))


def _close_with_timeout_on_signal(seconds: int) -> None:
    """For a torch without a shutdown timeout setting (such as the image's 2.7): its agent stops the
    workers with ``PContext.close(death_sig)``, whose timeout defaults to 30 s. Torch offers no other
    way to change that, so this wraps ``PContext.close`` (a public method, but a monkeypatch all
    the same) to use ``seconds`` when it runs while the agent handles the SignalException of a
    stop signal (``sys.exc_info()``), as the newer torch does; every other close is unchanged."""
    from torch.distributed.elastic.multiprocessing.api import PContext, SignalException

    original = getattr(PContext.close, "__wrapped__", PContext.close)

    @functools.wraps(original)
    def close(self, death_sig=None, timeout=30):
        if isinstance(sys.exc_info()[1], SignalException):
            timeout = seconds
        return original(self, death_sig, timeout)

    PContext.close = close


def configure_shutdown(env: MutableMapping[str, str] | None = None) -> int | None:
    """Give the workers the configured time after SIGTERM (torch's own setting where it has one)."""
    env = os.environ if env is None else env
    seconds = configured_shutdown_timeout(env)
    if seconds is None:
        return None
    if _torch_has_shutdown_timeout():
        env[TORCH_SHUTDOWN_ENV] = str(seconds)  # read by LaunchConfig; --shutdown-timeout still wins
    else:
        _close_with_timeout_on_signal(seconds)
    return seconds


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    configure_shutdown()
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
