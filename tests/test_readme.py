"""Every command in README.md runs as written, against a real fleet.

The README's fenced blocks without a language (or `sh`/`bash`) are shell commands and the
`python` block is the client example. They run in the README's order, from a scratch directory
that has the project's `.venv` and `tests/` beside it (so `.venv/bin/mcpfleet ...` resolves as it
does in a checkout), against a fleet of the test's own. The only changes made to a command are
the ones a reader makes: the fleet's address for 127.0.0.1:8080 and real keys for the
placeholders (`<key>`, `<pat's key>`, `mcpf_...`; `$TOKEN` and `$KEY` are set in the environment).
A block is run unless a rule in SKIPPED names its first word; a rule that matches no block fails.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, Fleet, make_fleet

README = ROOT / "README.md"
SHELL_LANGUAGES = {"", "sh", "bash"}

# First word of a block -> why it cannot run inside the suite.
SKIPPED = {
    "make": "`make run` serves a fleet and `make test` runs this suite: the test's own fleet stands in for the first",
    "kubectl": "needs a Kubernetes cluster with the operator installed",
    "Pending": "the sandbox lifecycle diagram, not commands",
    "cli/": "the source layout, not commands",
    "cli": "the layer diagram, not commands",
}
# The README's address and the placeholders of keys; which user's key each one stands for.
README_ADDRESS = "127.0.0.1:8080"
KEY_PLACEHOLDERS = {"<key>": "alice", "<pat's key>": "pat", "<ada's key>": "ada", "<any key>": "alice", "mcpf_...": "alice"}
SECRET_VALUE = "readme-secret-value"  # $TOKEN, and what a reader types at a prompt
COMMAND_TIMEOUT_S = 300  # `publish` waits for the trial run in a gVisor sandbox


@dataclass
class Block:
    line: int  # of its first line inside the fence, 1-based
    language: str
    text: str

    @property
    def first_word(self) -> str:
        return self.text.split(maxsplit=1)[0] if self.text.strip() else ""


def readme_blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        opening = re.fullmatch(r"```(\w*)\s*", lines[index])
        if opening is None:
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].strip() == "```")
        blocks.append(Block(line=index + 2, language=opening.group(1), text="\n".join(lines[index + 1 : end])))
        index = end + 1
    return blocks


def shell_commands(block: Block) -> list[tuple[int, str]]:
    """The block's commands with their README line numbers; a trailing backslash continues a line."""
    commands: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for offset, line in enumerate(block.text.splitlines()):
        if pending is None:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            pending = (block.line + offset, line)
        else:
            pending = (pending[0], pending[1] + "\n" + line)
        if not line.rstrip().endswith("\\"):
            commands.append(pending)
            pending = None
    assert pending is None, f"README.md:{block.line}: a block ends in a continued line"
    return commands


class ReadmeRun:
    """Runs the README's commands as a reader does, remembering the keys they print."""

    def __init__(self, fleet: Fleet, workdir: Path) -> None:
        self.fleet = fleet
        self.workdir = workdir
        self.keys: dict[str, str] = {}
        self.ran: list[str] = []
        self.failures: list[str] = []

    def substitute(self, command: str) -> str:
        command = command.replace(README_ADDRESS, f"127.0.0.1:{self.fleet.port}")
        for placeholder, user in KEY_PLACEHOLDERS.items():
            if placeholder in command:
                assert user in self.keys, f"{placeholder} is used before the README creates {user}'s key"
                command = command.replace(placeholder, self.keys[user])
        return command

    def env(self) -> dict[str, str]:
        # PYTHONPATH: .venv/bin/mcpfleet is the shared virtualenv's entry point; this checkout's code runs.
        extra = {"PYTHONPATH": str(ROOT), "TOKEN": SECRET_VALUE, "KEY": self.keys.get("alice", "")}
        return {**self.fleet.env, **extra}

    def run(self, line: int, command: str, argv: list[str]) -> subprocess.CompletedProcess[str] | None:
        try:
            done = subprocess.run(argv, cwd=self.workdir, env=self.env(), input=SECRET_VALUE, capture_output=True,
                                  text=True, timeout=COMMAND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.failures.append(f"README.md:{line}: timed out after {COMMAND_TIMEOUT_S} s: {command}")
            return None
        self.ran.append(f"README.md:{line}: {command.splitlines()[0]}")
        if done.returncode != 0:
            self.failures.append(f"README.md:{line}: exit {done.returncode}: {command}\n{done.stdout}\n{done.stderr}")
            return None
        return done

    def shell(self, block: Block) -> None:
        for line, command in shell_commands(block):
            done = self.run(line, command, ["bash", "-c", self.substitute(command)])
            created = re.search(r"keys create (\w+)", command)
            if done is not None and created:
                self.keys[created.group(1)] = done.stdout.strip().splitlines()[-1]
            if done is not None and "/api/secrets/" in command:
                self.check_secret_was_put(line)

    def check_secret_was_put(self, line: int) -> None:
        # curl exits 0 on an HTTP error too: the secret it PUTs must be there afterwards.
        listed = self.fleet.cli("secrets", "list", "alice").stdout
        if "GITHUB_TOKEN" not in listed:
            self.failures.append(f"README.md:{line}: the curl PUT left no GITHUB_TOKEN for alice:\n{listed}")

    def python(self, block: Block) -> None:
        done = self.run(block.line, block.text, [sys.executable, "-c", self.substitute(block.text)])
        if done is None:
            return
        # It prints the list of tool names, then exec__run's text: its exit code, then uname -r's stdout.
        tools, _, ran = done.stdout.partition("\n")
        if "'exec__run'" not in tools or not re.search(r"^\d+\.\d+\.\d+$", ran, re.MULTILINE):
            self.failures.append(f"README.md:{block.line}: the client example printed no tools and uname:\n{done.stdout}")


def test_every_skip_rule_matches_a_block_of_the_readme() -> None:
    """A rule whose block is gone is removed, so that SKIPPED lists only what is knowingly not run."""
    first_words = {block.first_word for block in readme_blocks(README.read_text())}
    assert not set(SKIPPED) - first_words, f"skip rules for blocks the README no longer has: {set(SKIPPED) - first_words}"


@pytest.fixture(scope="module")
def readme_fleet(tmp_path_factory: pytest.TempPathFactory, postgres_url: str):
    running = make_fleet(tmp_path_factory, postgres_url)
    running.start()
    yield running
    running.stop()


def test_every_command_of_the_readme_runs_as_written(readme_fleet: Fleet, tmp_path: Path) -> None:
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    readme = ReadmeRun(readme_fleet, tmp_path)
    for block in readme_blocks(README.read_text()):
        if block.first_word in SKIPPED:
            continue
        if block.language == "python":
            readme.python(block)
        elif block.language in SHELL_LANGUAGES:
            readme.shell(block)
        else:
            readme.failures.append(f"README.md:{block.line}: a ```{block.language} block this test does not know how to run")
    print("\n".join(readme.ran))
    assert len(readme.ran) >= 15, "the README's commands were not found"
    assert not readme.failures, "README commands that fail as written:\n\n" + "\n\n".join(readme.failures)
    assert (tmp_path / "weather").is_dir()  # `mcpfleet init weather` ran here, not in the checkout
