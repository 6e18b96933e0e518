"""The secret store against a real OpenBao (the embedded one, and the same server reached as an
external Vault by VAULT_ADDR with AppRole or a token): layout, fallback, the gateway token's
policy, a restart, and Vault down. No sandbox here: tests/test_secrets.py covers injection."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import hvac
import hvac.exceptions
import pytest

from core.openbao import MOUNT, POLICY, TRANSIT, TRANSIT_KEY, EmbeddedOpenBao
from core.vault import SecretError, SecretStore, VaultUnavailable, open_secrets

SERVER = "io.example/weather"


@pytest.fixture
def bao(tmp_path: Path):
    server = EmbeddedOpenBao(tmp_path)
    started = time.perf_counter()
    server.start()
    print(f"\nOpenBao started, initialised and unsealed in {time.perf_counter() - started:.2f} s, "
          f"{(server.memory_bytes() or 0) / 2**20:.0f} MB resident")
    yield server
    server.stop()


def store_of(bao: EmbeddedOpenBao) -> SecretStore:
    return SecretStore(lambda: hvac.Client(bao.addr, token=bao.token()))


async def test_layout_fallback_versions_and_removal(bao):
    store = store_of(bao)
    assert await store.put("acme", "alice", SERVER, "API_KEY", "alice-value-1") == 1
    assert await store.put("acme", "alice", SERVER, "API_KEY", "alice-value-2") == 2
    assert await store.put("acme", None, SERVER, "API_KEY", "tenant-value") == 1
    assert await store.put("acme", None, SERVER, "REGION", "eu-north") == 1
    assert await store.values("acme", "alice", SERVER, ["API_KEY", "REGION", "NOPE"]) == (
        {"API_KEY": "alice-value-2", "REGION": "eu-north"}, ["NOPE"])
    # Another user of the tenant gets the tenant's; a user of another tenant gets nothing.
    assert (await store.values("acme", "bob", SERVER, ["API_KEY"]))[0] == {"API_KEY": "tenant-value"}
    assert await store.values("other", "alice", SERVER, ["API_KEY"]) == ({}, ["API_KEY"])
    listed = await store.list_secrets("acme", "alice")
    assert [(s.server, s.name, s.version) for s in listed] == [(SERVER, "API_KEY", 2)]
    assert "value" not in str(listed[0].as_dict()).replace("version", "")
    assert await store.delete("acme", "alice", SERVER, "API_KEY")
    assert not await store.delete("acme", "alice", SERVER, "API_KEY")
    assert (await store.values("acme", "alice", SERVER, ["API_KEY"]))[0] == {"API_KEY": "tenant-value"}


async def test_names_that_would_leave_their_place_are_refused(bao):
    store = store_of(bao)
    for tenant, user, server, name in (
        ("acme", "../shared", SERVER, "API_KEY"), ("acme", "a/b", SERVER, "API_KEY"), ("..", "alice", SERVER, "API_KEY"),
        ("acme", "alice", "io.example/../x", "API_KEY"), ("acme", "alice", "noslash", "API_KEY"),
        ("acme", "alice", SERVER, "api_key"), ("acme", "alice", SERVER, "A/B"),
    ):
        with pytest.raises(SecretError):
            await store.put(tenant, user, server, name, "v")
    with pytest.raises(SecretError, match="NUL"):
        await store.put("acme", "alice", SERVER, "API_KEY", "a\x00b")


def test_the_gateways_token_reaches_its_mount_and_nothing_else(bao):
    client = hvac.Client(bao.addr, token=bao.token())
    assert client.lookup_token()["data"]["policies"] == ["default", POLICY]
    client.secrets.kv.v2.create_or_update_secret(path="tenants/t/users/u/a/b/X", secret={"value": "v"}, mount_point=MOUNT)
    for forbidden in (
        lambda: client.sys.list_mounted_secrets_engines(),
        lambda: client.sys.enable_secrets_engine("kv", path="mine"),
        lambda: client.auth.token.create(policies=["root"]),
        lambda: client.sys.list_enabled_audit_devices(),
        lambda: client.sys.create_or_update_policy(POLICY, 'path "*" { capabilities = ["sudo"] }'),
        lambda: client.secrets.transit.read_key(TRANSIT_KEY, mount_point=TRANSIT),
        lambda: client.secrets.transit.export_key(TRANSIT_KEY, key_type="encryption-key", mount_point=TRANSIT),
        lambda: client.secrets.transit.rotate_key(TRANSIT_KEY, mount_point=TRANSIT),
    ):
        with pytest.raises(hvac.exceptions.Forbidden):
            forbidden()


async def test_secrets_survive_a_restart_and_a_stopped_vault_is_a_clear_error(tmp_path):
    with open_secrets(tmp_path) as store:
        await store.put("acme", "alice", SERVER, "API_KEY", "kept-value")
    with open_secrets(tmp_path) as store:
        assert (await store.values("acme", "alice", SERVER, ["API_KEY"]))[0] == {"API_KEY": "kept-value"}
        os.kill(int((tmp_path / "openbao" / "pid").read_text()), signal.SIGKILL)
        await asyncio.sleep(0.3)
        with pytest.raises(VaultUnavailable, match="cannot be reached") as down:
            await store.values("acme", "alice", SERVER, ["API_KEY"])
        assert "kept-value" not in str(down.value)


async def test_an_external_vault_by_vault_addr_with_approle_or_a_token(bao, tmp_path, monkeypatch):
    """The embedded server stands in for an operator's Vault here: reached only by address and login."""
    root = hvac.Client(bao.addr, token=(bao.dir / "root-token").read_text().strip())
    root.sys.enable_auth_method("approle")
    root.auth.approle.create_or_update_approle("gateway", token_policies=[POLICY], token_ttl="1h")
    role_id = root.auth.approle.read_role_id("gateway")["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id("gateway")["data"]["secret_id"]
    elsewhere = tmp_path / "other-home"
    monkeypatch.setenv("VAULT_ADDR", bao.addr)
    monkeypatch.setenv("VAULT_ROLE_ID", role_id)
    monkeypatch.setenv("VAULT_SECRET_ID", secret_id)
    with open_secrets(elsewhere) as store:
        assert store.where == f"Vault at {bao.addr}"
        await store.put("acme", "alice", SERVER, "API_KEY", "via-approle")
    assert not (elsewhere / "openbao").exists()  # no embedded server when VAULT_ADDR names one
    monkeypatch.delenv("VAULT_ROLE_ID")
    monkeypatch.delenv("VAULT_SECRET_ID")
    monkeypatch.setenv("VAULT_TOKEN", bao.token())
    with open_secrets(elsewhere) as store:
        assert (await store.values("acme", "alice", SERVER, ["API_KEY"]))[0] == {"API_KEY": "via-approle"}
    monkeypatch.setenv("VAULT_TOKEN", "not-a-token")
    with open_secrets(elsewhere) as store:
        with pytest.raises(VaultUnavailable, match="refused the fleet's token"):
            await store.values("acme", "alice", SERVER, ["API_KEY"])


def test_a_checkpoint_image_is_sealed_with_a_transit_data_key_and_unsealed_intact(bao, tmp_path):
    from core.sealed_images import CHUNK, KEY_FILE, SealedImages, SealError

    images = SealedImages(store_of(bao))
    image = tmp_path / "checkpoint"
    (image / "sub").mkdir(parents=True)
    marker = b"memory-holding-a-secret-value"
    contents = {"pages.img": os.urandom(CHUNK) + marker + os.urandom(CHUNK // 2), "sub/meta.json": b'{"x": 1}' + marker,
                "empty": b""}
    for name, data in contents.items():
        (image / name).write_bytes(data)
    started = time.perf_counter()
    images.seal(image)
    print(f"\nsealed {sum(map(len, contents.values())) / 2**20:.1f} MiB in {(time.perf_counter() - started) * 1e3:.0f} ms")
    on_disk = b"".join(p.read_bytes() for p in image.rglob("*") if p.is_file())
    assert marker not in on_disk and (image / KEY_FILE).exists()
    assert not any((image / name).exists() for name in contents)
    images.unseal(image)
    assert {str(p.relative_to(image)): p.read_bytes() for p in image.rglob("*") if p.is_file()} == contents

    # A changed byte, a file cut short: refused, never restored.
    images.seal(image)
    sealed = image / "pages.img.sealed"
    data = bytearray(sealed.read_bytes())
    data[100] ^= 1
    sealed.write_bytes(bytes(data))
    with pytest.raises(SealError, match="changed"):
        images.unseal(image)
    cut = tmp_path / "cut"
    (cut).mkdir()
    (cut / "pages.img").write_bytes(contents["pages.img"])
    images.seal(cut)
    whole = (cut / "pages.img.sealed").read_bytes()
    first = 12 + 4 + int.from_bytes(whole[12:16], "big")  # header, then the first chunk's length and chunk
    assert first < len(whole)
    (cut / "pages.img.sealed").write_bytes(whole[:first])  # the first chunk alone
    with pytest.raises(SealError):
        images.unseal(cut)


def test_a_sealed_image_is_compressed_and_its_compression_cannot_be_flipped(bao, tmp_path):
    """Images are compressed before they are encrypted (memory pages compress; ciphertext does not),
    the header's claim of compression is bound into every chunk, and an image sealed without
    compression, as earlier gateways did, still unseals."""
    from core.sealed_images import CHUNK, MAGIC, MAGIC_ZSTD, SealedImages, SealError

    store = store_of(bao)
    # Memory-like content: repeated structures with some noise, over several chunks.
    pages = b"".join(os.urandom(64) + bytes(range(256)) * 16 + i.to_bytes(4, "big") * 64 for i in range(3 * CHUNK // 4416))
    contents = {"pages.img": pages + b"tail", "checkpoint.img": b"state" * 1000, "empty": b""}

    def image_at(name: str) -> Path:
        image = tmp_path / name
        image.mkdir()
        for file, data in contents.items():
            (image / file).write_bytes(data)
        return image

    compressed, plain = image_at("compressed"), image_at("plain")
    SealedImages(store).seal(compressed)
    SealedImages(store, compress=False).seal(plain)
    size = (compressed / "pages.img.sealed").stat().st_size
    assert (compressed / "pages.img.sealed").read_bytes()[:4] == MAGIC_ZSTD and size < len(pages) / 4
    assert (plain / "pages.img.sealed").read_bytes()[:4] == MAGIC and (plain / "pages.img.sealed").stat().st_size > len(pages)
    print(f"\nsealed {len(pages) / 2**20:.1f} MiB into {size / 2**20:.2f} MiB compressed")
    for image in (compressed, plain):  # whichever way it was sealed, the fleet unseals it
        SealedImages(store).unseal(image)
        assert {p.name: p.read_bytes() for p in image.iterdir()} == contents

    # Saying a compressed file is not compressed (or the reverse) is a change like any other.
    for image, claim in ((compressed, MAGIC), (plain, MAGIC_ZSTD)):
        SealedImages(store, compress=claim == MAGIC).seal(image)
        sealed = image / "pages.img.sealed"
        sealed.write_bytes(claim + sealed.read_bytes()[4:])
        with pytest.raises(SealError, match="changed"):
            SealedImages(store).unseal(image)


def test_a_seal_or_unseal_cut_short_is_finished_by_sealing_again(bao, tmp_path, monkeypatch):
    """A gateway killed while it sealed (or unsealed) a checkpoint: recovery seals the directory
    again, which must finish the work under the first key without losing or garbling a file."""
    import core.sealed_images as sealed_images
    from core.sealed_images import KEY_FILE, SUFFIX, SealedImages

    images = SealedImages(store_of(bao))
    image = tmp_path / "checkpoint"
    image.mkdir()
    contents = {f"part{i}.img": os.urandom(100_000 + i) + b"secret-marker" for i in range(4)}
    for name, data in contents.items():
        (image / name).write_bytes(data)

    # Killed after two files were sealed, while the third was half written.
    real_seal = sealed_images._seal_file
    done: list[str] = []

    def dies_on_the_third(aes, path, name, work):
        if len(done) == 2:
            (path.with_name(path.name + sealed_images.STAGED)).write_bytes(b"MFS2half")
            raise KeyboardInterrupt
        real_seal(aes, path, name, work)
        done.append(name)

    monkeypatch.setattr(sealed_images, "_seal_file", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        images.seal(image)
    monkeypatch.setattr(sealed_images, "_seal_file", real_seal)
    assert (image / KEY_FILE).exists() and len(list(image.glob("*" + SUFFIX))) == 2
    images.seal(image)  # what recovery does
    assert sorted(p.name for p in image.iterdir()) == sorted([KEY_FILE, *(n + SUFFIX for n in contents)])
    images.unseal(image)
    assert {p.name: p.read_bytes() for p in image.iterdir()} == contents

    # Killed while unsealing: one file restored, one half-written; sealing again, then a resume.
    images.seal(image)
    real_unseal = sealed_images._unseal_file
    opened: list[str] = []

    def dies_on_the_second(aes, target, name, work):
        if opened:
            (target.with_name(target.name + sealed_images.STAGED)).write_bytes(b"half")
            raise KeyboardInterrupt
        real_unseal(aes, target, name, work)
        opened.append(name)

    monkeypatch.setattr(sealed_images, "_unseal_file", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        images.unseal(image)
    monkeypatch.setattr(sealed_images, "_unseal_file", real_unseal)
    assert any(not p.name.endswith(SUFFIX) and p.name != KEY_FILE for p in image.iterdir())
    images.seal(image)
    assert all(p.name.endswith(SUFFIX) or p.name == KEY_FILE for p in image.iterdir())
    images.unseal(image)
    assert {p.name: p.read_bytes() for p in image.iterdir()} == contents


def test_an_openbao_left_by_a_killed_gateway_is_stopped_and_nothing_else_is(bao, tmp_path: Path):
    pid = int((bao.dir / "pid").read_text())
    left = EmbeddedOpenBao(tmp_path)  # a later process of the same home, which did not start it
    # A pid file naming another process (the pid was reused) signals nothing.
    (bao.dir / "pid").write_text(str(os.getpid()))
    assert not left.stop_left()
    (bao.dir / "pid").write_text(str(pid))
    assert left.stop_left()
    assert left.running() is None and not (bao.dir / "pid").exists()
    assert not EmbeddedOpenBao(tmp_path).stop_left()  # nothing left now
