"""Being PID 1: reap orphans and pass signals on to the real supervisor.

Processes whose parent exits are re-parented to PID 1; something has to wait
for them or they stay zombies for the sandbox's lifetime. The supervisor's
event loop only waits for its own children, so PID 1 is this small loop and the
supervisor runs as its child. When the supervisor exits, so does PID 1, which
ends the sandbox.

Sandboxes started by this product run tini as PID 1 instead (`sandbox.bundle.INIT`), and the
supervisor is its child: this loop is the fallback where tini is missing, and a second Python
(about 20 MiB inside gVisor) is what it costs.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def run_as_init(main: Callable[[], int]) -> int:
    """Run `main`; if this process is PID 1, in a child, reaping everything meanwhile."""
    if os.getpid() != 1:
        return main()
    pid = os.fork()
    if pid == 0:
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        code = 1
        try:
            code = main()
        except BaseException as exc:  # noqa: BLE001 - the child must never return into the init loop
            print(f"supervisor crashed: {exc!r}", file=sys.stderr, flush=True)
        finally:
            os._exit(code)

    def forward(signum: int, frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    while True:
        try:
            reaped, status = os.wait()
        except ChildProcessError:
            return 1
        if reaped == pid:
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code
