"""`python -m sandbox.supervisor.launch FD ARGV...`: start a Python server with its own environment
(secrets, egress proxy credentials) read from pipe FD, never in the environment it was executed with.

gVisor (both runsc builds here, measured by tests/test_attacks_uids.py) lets any process read any
other's /proc/PID/environ, whatever its uid, where Linux asks for ptrace access. That file shows the
environment a process was executed with, on its stack; what the process adds later (putenv) lives in
its heap, which a process of another uid cannot read (/proc/PID/mem is refused). So the supervisor
executes the launcher with the sandbox's common environment only, hands it the server's own on a pipe,
and the launcher adds it to os.environ and runs the server in the same process, as the interpreter
would have: `-m MODULE`, `-c CODE` or a script path, each with its arguments. (A process the server
executes itself inherits os.environ, and with it the secrets, in its own /proc/PID/environ.)
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import types

FORMS = ("-m", "-c")


def runnable(argv: list[str]) -> bool:
    """Whether the interpreter's arguments (after `python` and its flags) are a form the launcher runs."""
    return bool(argv) and (argv[0] in FORMS and len(argv) >= 2 or not argv[0].startswith("-"))


def read_environment(fd: int) -> dict[str, str]:
    chunks = []
    with os.fdopen(fd, "rb") as pipe:
        while chunk := pipe.read():
            chunks.append(chunk)
    env = json.loads(b"".join(chunks))
    if not isinstance(env, dict):
        raise ValueError("the launcher's environment is not an object")
    return {str(k): str(v) for k, v in env.items()}


def main() -> None:
    if len(sys.argv) < 3 or not runnable(sys.argv[2:]):
        sys.exit("usage: python -m sandbox.supervisor.launch FD (-m MODULE | -c CODE | SCRIPT) [ARG...]")
    os.environ.update(read_environment(int(sys.argv[1])))
    run(sys.argv[2:])


def run(argv: list[str]) -> None:
    """Run `-m MODULE`, `-c CODE` or a script, each with its arguments, as the interpreter would."""
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]  # runpy puts the module's path first, as `python -m` does
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    elif argv[0] == "-c":
        sys.argv = ["-c", *argv[2:]]
        main_module = types.ModuleType("__main__")
        sys.modules["__main__"] = main_module
        exec(compile(argv[1], "<string>", "exec"), main_module.__dict__)  # noqa: S102 - the server's own code, as `python -c`
    else:
        sys.argv = list(argv)
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
