"""Checkpoint images encrypted at rest: they hold a sandbox's memory, so its servers' secrets.

Each image gets a fresh data key from Vault's transit engine (`SecretStore.data_key`): the key
encrypts every file of the image with AES-GCM and only its wrapped form is kept beside them
(`sealed.key`); resuming asks Vault to unwrap it. Files are encrypted in chunks (an image may be
larger than memory should hold at once), each chunk's nonce and associated data binding it to its
file, its place and whether it is the last, so that chunks cannot be reordered, moved between
files, or cut off unnoticed.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from core.errors import FleetError
from core.vault import SecretStore

log = logging.getLogger(__name__)

SUFFIX = ".sealed"
KEY_FILE = "sealed.key"
STAGED = ".staged"
"""A file being written under its final name plus this: renamed once whole."""
MAGIC = b"MFS1"
CHUNK = 4 * 2**20


class SealError(FleetError):
    """An image could not be encrypted or decrypted (Vault down, a changed file)."""


def _aad(name: str, index: int, last: bool) -> bytes:
    return f"{name}\x00{index}\x00{int(last)}".encode()


def _seal_file(aes: AESGCM, path: Path, name: str) -> None:
    """`path` → `path.sealed`, written under a staging name and renamed: a `.sealed` file is whole."""
    prefix = os.urandom(8)
    target = path.with_name(path.name + SUFFIX)
    if target.exists():  # sealed before an interruption: only the clear copy was left to remove
        path.unlink()
        return
    staged = path.with_name(path.name + STAGED)
    with open(path, "rb") as src, open(staged, "wb") as out:
        out.write(MAGIC + prefix)
        index = 0
        chunk = src.read(CHUNK)
        while True:
            following = src.read(CHUNK)
            last = not following
            sealed = aes.encrypt(prefix + struct.pack(">I", index), chunk, _aad(name, index, last))
            out.write(struct.pack(">I", len(sealed)) + sealed)
            if last:
                break
            chunk, index = following, index + 1
    os.replace(staged, target)
    path.unlink()


def _unseal_file(aes: AESGCM, target: Path, name: str) -> None:
    """`target.sealed` → `target`, staged and renamed likewise: a clear file is whole too."""
    source = target.with_name(target.name + SUFFIX)
    staged = target.with_name(target.name + STAGED)
    with open(source, "rb") as src, open(staged, "wb") as out:
        head = src.read(12)
        if head[:4] != MAGIC:
            raise SealError(f"{source.name} is not a sealed checkpoint file")
        prefix, index = head[4:], 0
        while True:
            size = src.read(4)
            if len(size) < 4:
                raise SealError(f"{source.name} ends early: the image is cut off")
            sealed = src.read(struct.unpack(">I", size)[0])
            last = not src.peek(1)
            try:
                out.write(aes.decrypt(prefix + struct.pack(">I", index), sealed, _aad(name, index, last)))
            except InvalidTag:
                raise SealError(f"{source.name} was changed (chunk {index} does not authenticate)") from None
            if last:
                break
            index += 1
    os.replace(staged, target)
    source.unlink()


class SealedImages:
    """`seal` and `unseal` a checkpoint dir in place, with data keys from `store`'s transit engine. Blocking."""

    def __init__(self, store: SecretStore):
        self.store = store

    def seal(self, directory: Path) -> None:
        """Seal every file of `directory` still in the clear. The wrapped key is written first, so a
        seal cut short (the gateway killed mid-way) is finished by sealing the same directory again,
        under the same key: a file still in the clear is sealed anew, its half-written seal replaced."""
        started = time.perf_counter()
        key_file = directory / KEY_FILE
        _drop_staged(directory)
        clear = [
            p for p in sorted(directory.rglob("*"))
            if p.is_file() and not p.is_symlink() and not p.name.endswith(SUFFIX) and p != key_file
        ]  # fmt: skip
        if key_file.exists():
            if not clear:
                return  # sealed already (a recovery asks of every checkpoint)
            aes = AESGCM(self.store.unwrap(_wrapped(key_file)))
        else:
            key, wrapped = self.store.data_key()
            aes = AESGCM(key)
            staged = key_file.with_name(KEY_FILE + STAGED)
            staged.write_text(json.dumps({"wrapped": wrapped}))
            os.replace(staged, key_file)
        for path in clear:
            _seal_file(aes, path, str(path.relative_to(directory)))
        log.info("checkpoint %s sealed in %.2fs", directory.name, time.perf_counter() - started)

    def unseal(self, directory: Path) -> None:
        started = time.perf_counter()
        aes = AESGCM(self.store.unwrap(_wrapped(directory / KEY_FILE)))
        _drop_staged(directory)
        for source in sorted(directory.rglob("*" + SUFFIX)):
            target = source.with_name(source.name[: -len(SUFFIX)])
            _unseal_file(aes, target, str(target.relative_to(directory)))
        (directory / KEY_FILE).unlink()
        log.info("checkpoint %s unsealed in %.2fs", directory.name, time.perf_counter() - started)


def _wrapped(key_file: Path) -> str:
    try:
        wrapped = json.loads(key_file.read_text())["wrapped"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SealError(f"the checkpoint's key is unreadable ({type(exc).__name__})") from None
    if not isinstance(wrapped, str):
        raise SealError("the checkpoint's key is unreadable (not a wrapped key)")
    return wrapped


def _drop_staged(directory: Path) -> None:
    """Half-written files of an interrupted seal or unseal: their source is still whole."""
    for staged in directory.rglob("*" + STAGED):
        staged.unlink()
