"""Checkpoint images encrypted at rest: they hold a sandbox's memory, so its servers' secrets.

Each image gets a fresh data key from Vault's transit engine (`SecretStore.data_key`): the key
encrypts every file of the image with AES-GCM and only its wrapped form is kept beside them
(`sealed.key`); resuming asks Vault to unwrap it. Files are encrypted in chunks (an image may be
larger than memory should hold at once), each chunk's nonce and associated data binding it to its
file, its place and whether it is the last, so that chunks cannot be reordered, moved between
files, or cut off unnoticed.

Each chunk is compressed (zstd) before it is encrypted: a sandbox's memory compresses about 4-5x,
and hibernated sandboxes cost disk, not memory. Whether a file's chunks are compressed is said by
its header and bound into every chunk's associated data, so it cannot be flipped either. Images
sealed without compression (`compress=False`, and those of earlier gateways) unseal as before.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from io import BufferedReader
from pathlib import Path
from typing import BinaryIO, TypeVar

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from core.errors import FleetError
from core.vault import SecretStore

log = logging.getLogger(__name__)
T = TypeVar("T")

SUFFIX = ".sealed"
KEY_FILE = "sealed.key"
STAGED = ".staged"
"""A file being written under its final name plus this: renamed once whole."""
MAGIC = b"MFS1"
"""A file whose chunks were sealed as they are."""
MAGIC_ZSTD = b"MFS2"
"""A file whose chunks were each compressed with zstd, then sealed."""
CHUNK = 4 * 2**20
IN_FLIGHT = 4
"""Chunks being (de)compressed at once, by WORKERS threads."""
WORKERS = 2
ZSTD_LEVEL = 1
"""zstd's fastest level: it left a 147 MiB image of a used sandbox at 32 MiB in 0.30 s, its default
(3) at 29 MiB in 0.40 s; the seal runs in every hibernation."""


class SealError(FleetError):
    """An image could not be encrypted or decrypted (Vault down, a changed file)."""


def _aad(name: str, index: int, last: bool, compressed: bool) -> bytes:
    return f"{name}\x00{index}\x00{int(last)}{chr(0) + 'zstd' if compressed else ''}".encode()


def _compress(chunk: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(chunk)  # one per call: they are not thread-safe


def _decompress(chunk: bytes) -> bytes:
    # Authenticated before this, so written by a seal: never more than CHUNK bytes in the clear.
    return zstandard.ZstdDecompressor().decompress(chunk, max_output_size=CHUNK)


def _in_order(work: Executor, fn: Callable[[bytes], bytes], items: Iterator[tuple[T, bytes]]) -> Iterator[tuple[T, bytes]]:
    """(where, fn(chunk)) for each (where, chunk), in order, with up to IN_FLIGHT chunks being worked
    on at once: zstd lets go of the GIL, so chunks are (de)compressed on both cores while this thread
    reads, encrypts or decrypts, and writes; and no more than IN_FLIGHT chunks are held in memory."""
    pending: deque[tuple[T, Future[bytes]]] = deque()
    for where, chunk in items:
        pending.append((where, work.submit(fn, chunk)))
        if len(pending) > IN_FLIGHT:
            done, result = pending.popleft()
            yield done, result.result()
    while pending:
        done, result = pending.popleft()
        yield done, result.result()


def _chunks(src: BinaryIO) -> Iterator[tuple[tuple[int, bool], bytes]]:
    """((index, whether it is the last), chunk) of a clear file; an empty file is one empty chunk."""
    index, chunk = 0, src.read(CHUNK)
    while True:
        following = src.read(CHUNK)
        yield (index, not following), chunk
        if not following:
            return
        chunk, index = following, index + 1


def _seal_file(aes: AESGCM, path: Path, name: str, work: Executor | None) -> None:
    """`path` → `path.sealed`, written under a staging name and renamed: a `.sealed` file is whole.
    Each chunk is compressed first when `work` (threads for it) is given."""
    prefix = os.urandom(8)
    target = path.with_name(path.name + SUFFIX)
    if target.exists():  # sealed before an interruption: only the clear copy was left to remove
        path.unlink()
        return
    staged = path.with_name(path.name + STAGED)
    with open(path, "rb") as src, open(staged, "wb") as out:
        out.write((MAGIC if work is None else MAGIC_ZSTD) + prefix)
        chunks = _chunks(src) if work is None else _in_order(work, _compress, _chunks(src))
        for (index, last), plain in chunks:
            sealed = aes.encrypt(prefix + struct.pack(">I", index), plain, _aad(name, index, last, work is not None))
            out.write(struct.pack(">I", len(sealed)) + sealed)
    os.replace(staged, target)
    path.unlink()


def _unseal_file(aes: AESGCM, target: Path, name: str, work: Executor) -> None:
    """`target.sealed` → `target`, staged and renamed likewise: a clear file is whole too."""
    source = target.with_name(target.name + SUFFIX)
    staged = target.with_name(target.name + STAGED)
    with open(source, "rb") as src, open(staged, "wb") as out:
        head = src.read(12)
        if head[:4] not in (MAGIC, MAGIC_ZSTD):
            raise SealError(f"{source.name} is not a sealed checkpoint file")
        compressed = head[:4] == MAGIC_ZSTD
        opened = _opened(aes, src, source.name, head[4:], name, compressed)
        for _, clear in _in_order(work, _decompress, opened) if compressed else opened:
            out.write(clear)
    os.replace(staged, target)
    source.unlink()


def _opened(aes: AESGCM, src: BufferedReader, file: str, prefix: bytes, name: str, compressed: bool) -> Iterator[tuple[int, bytes]]:
    """(index, decrypted chunk) of a sealed file, each authenticated before it is given out."""
    index = 0
    while True:
        size = src.read(4)
        if len(size) < 4:
            raise SealError(f"{file} ends early: the image is cut off")
        sealed = src.read(struct.unpack(">I", size)[0])
        last = not src.peek(1)
        try:
            yield index, aes.decrypt(prefix + struct.pack(">I", index), sealed, _aad(name, index, last, compressed))
        except InvalidTag:
            raise SealError(f"{file} was changed (chunk {index} does not authenticate)") from None
        if last:
            return
        index += 1


class SealedImages:
    """`seal` and `unseal` a checkpoint dir in place, with data keys from `store`'s transit engine;
    `compress` (the fleet's way) compresses each chunk first. Blocking."""

    def __init__(self, store: SecretStore, compress: bool = True):
        self.store = store
        self.compress = compress

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
        with ThreadPoolExecutor(WORKERS, thread_name_prefix="seal") as work:
            for path in clear:
                _seal_file(aes, path, str(path.relative_to(directory)), work if self.compress else None)
        log.info("checkpoint %s sealed in %.2fs", directory.name, time.perf_counter() - started)

    def unseal(self, directory: Path) -> None:
        started = time.perf_counter()
        aes = AESGCM(self.store.unwrap(_wrapped(directory / KEY_FILE)))
        _drop_staged(directory)
        with ThreadPoolExecutor(WORKERS, thread_name_prefix="unseal") as work:
            for source in sorted(directory.rglob("*" + SUFFIX)):
                target = source.with_name(source.name[: -len(SUFFIX)])
                _unseal_file(aes, target, str(target.relative_to(directory)), work)
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
