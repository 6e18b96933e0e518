"""Running one shell command with a time limit and bounded output."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field

import anyio
from anyio.abc import ByteReceiveStream

# After the shell exits, processes it left in the background may still hold its
# stdout/stderr open; their output is read for this long, then no longer.
LEFTOVER_GRACE_S = 0.5


@dataclass
class Capture:
    """The first `limit` bytes of a stream, and how many there were in all."""

    limit: int
    data: bytearray = field(default_factory=bytearray)
    total: int = 0
    done: anyio.Event = field(default_factory=anyio.Event)

    @property
    def truncated(self) -> bool:
        return self.total > len(self.data)

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")

    async def drain(self, stream: ByteReceiveStream) -> None:
        try:
            async for chunk in stream:
                self.total += len(chunk)
                room = self.limit - len(self.data)
                if room > 0:
                    self.data += chunk[:room]
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass
        finally:
            self.done.set()


@dataclass
class Outcome:
    returncode: int | None
    stdout: Capture
    stderr: Capture
    timed_out: bool
    duration_s: float


async def run_shell(command: str, *, cwd: str, timeout_s: float, output_limit: int) -> Outcome:
    """Run `/bin/sh -c command` in its own process group; on timeout the whole group is killed."""
    started = time.monotonic()
    stdout, stderr = Capture(output_limit), Capture(output_limit)
    timed_out = False
    process = await anyio.open_process(
        ["/bin/sh", "-c", command],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        async with anyio.create_task_group() as readers:
            assert process.stdout is not None and process.stderr is not None
            readers.start_soon(stdout.drain, process.stdout)
            readers.start_soon(stderr.drain, process.stderr)
            with anyio.move_on_after(timeout_s) as limit:
                await process.wait()
            if limit.cancelled_caught:
                timed_out = True
                _kill_group(process.pid)
                await process.wait()
            with anyio.move_on_after(LEFTOVER_GRACE_S):
                await stdout.done.wait()
                await stderr.done.wait()
            readers.cancel_scope.cancel()
    finally:
        # Reached too when the call is cancelled while the command runs: its group is killed.
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                _kill_group(process.pid)
                await process.wait()
            await process.aclose()
    return Outcome(
        returncode=None if timed_out else process.returncode,
        stdout=stdout,
        stderr=stderr,
        timed_out=timed_out,
        duration_s=time.monotonic() - started,
    )


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


async def start_background(command: str, *, cwd: str, log_dir: str) -> int:
    """Start `/bin/sh -c command` detached (own session, no stdin, output to `log_dir/<pid>.log`); its pid.

    An intermediate shell starts it and exits at once, so the command is orphaned to
    the sandbox's init, which reaps it: this server keeps nothing per background job.
    """
    os.makedirs(log_dir, mode=0o700, exist_ok=True)
    launcher = (
        'exec 0</dev/null; (setsid /bin/sh -c "$1" >"$2/$$.tmp" 2>&1 & echo $! >"$2/$$.pid"); '
        'pid=$(cat "$2/$$.pid"); rm "$2/$$.pid"; mv "$2/$$.tmp" "$2/$pid.log"; echo "$pid"'
    )
    result = await anyio.run_process(["/bin/sh", "-c", launcher, "sh", command, log_dir], cwd=cwd, check=True)
    return int(result.stdout.decode().strip())
