"""CURVE security over real tcp sockets: roster keys, the ZAP gatekeeper, encryption.

A roster peer pulls fine; a client with a key outside the roster, with no key at all
(plaintext) or with the wrong server key gets nothing, and the server counts the refused
handshake; the bytes on the wire carry no tensor in clear; ``zmqgossip keys`` writes
owner-only secret keys; a roster with ``security = "curve"`` runs to completion.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zmq
import zmq.asyncio
from typer.testing import CliRunner

from zmqgossip import wire
from zmqgossip.cli import app
from zmqgossip.security import (
    CurveKeys,
    SecurityError,
    generate_keys,
    load_keyring,
    public_path,
    running_gatekeeper,
    secret_path,
    stop_gatekeeper,
)
from zmqgossip.net import Transport, TransportError, make_directory
from zmqgossip.wire import ModelPayload, schema_of

REPO = Path(__file__).resolve().parents[1]
SERVER, CLIENT = 1, 0


def state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"fc.weight": torch.randn(16, 32, generator=g), "fc.bias": torch.randn(16, generator=g)}


@pytest.fixture
def keyring(tmp_path):
    folder = tmp_path / "keys"
    generate_keys(folder, [0, 1, 2])
    return load_keyring(folder, [0, 1, 2], [0, 1, 2])


async def wait_for(cond, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        await asyncio.sleep(0.02)
    return cond()


async def secure_server(ctx, directory, keys: CurveKeys, st) -> Transport:
    t = Transport(ctx, SERVER, directory, expect=schema_of(st), security=keys)
    await t.start()
    t.publish(ModelPayload.build(st, step=3, version=7, n_samples=100))
    return t


# ------------------------------------------------------------------ keys


def test_keys_command_writes_owner_only_secret_keys_and_refuses_to_overwrite(tmp_path):
    roster = tmp_path / "roster.toml"
    roster.write_text(roster_text("label-digits", [("a", 47500, [0, 1, 2]), ("b", 47600, list(range(3, 20)))]))
    res = CliRunner().invoke(app, ["keys", str(roster)])
    assert res.exit_code == 0, res.output
    folder = tmp_path / "keys"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for pid in range(20):
        sec, pub = secret_path(folder, pid), public_path(folder, pid)
        assert stat.S_IMODE(sec.stat().st_mode) == 0o600, sec
        assert b"secret-key" in sec.read_bytes()
        assert b"secret-key" not in pub.read_bytes()  # the public file holds no secret
    before = public_path(folder, 5).read_bytes()

    again = CliRunner().invoke(app, ["keys", str(roster)])
    assert again.exit_code == 2 and "--force" in again.output
    assert public_path(folder, 5).read_bytes() == before  # nothing was overwritten

    forced = CliRunner().invoke(app, ["keys", str(roster), "--force"])
    assert forced.exit_code == 0, forced.output
    assert public_path(folder, 5).read_bytes() != before
    assert stat.S_IMODE(secret_path(folder, 5).stat().st_mode) == 0o600
    ring = load_keyring(folder, range(20), [3, 4])
    assert len(ring.public) == 20 and sorted(ring.secret) == [3, 4]


def test_missing_or_unsafe_keys_are_refused_with_what_to_do(tmp_path):
    folder = tmp_path / "keys"
    with pytest.raises(SecurityError, match="zmqgossip keys"):
        load_keyring(folder, [0, 1], [0])
    generate_keys(folder, [0, 1])
    secret_path(folder, 1).unlink()
    with pytest.raises(SecurityError, match=r"peer 1 .*zmqgossip keys"):
        load_keyring(folder, [0, 1], [0, 1])
    load_keyring(folder, [0, 1], [0])  # a host needs only its own peers' secrets
    os.chmod(secret_path(folder, 0), 0o644)
    with pytest.raises(SecurityError, match="chmod 600"):
        load_keyring(folder, [0, 1], [0])


# ------------------------------------------------------------------ transports


def test_roster_peer_pulls_over_curve_and_gets_the_exact_model(keyring, actx, run_async):
    st = state()

    async def body():
        d = make_directory("tcp", [0, 1])
        server = await secure_server(actx, d, keyring.for_peer(SERVER), st)
        client = Transport(actx, CLIENT, d, expect=schema_of(st), security=keyring.for_peer(CLIENT))
        try:
            for _ in range(3):
                r = await client.pull(SERVER, timeout=5)
                assert r.ok, r
                assert r.message.version == 7
                for k in st:
                    assert torch.equal(r.message.tensors[k], st[k])
            assert await client.ping(SERVER) == {}
            assert server.counters.served == 3
            assert not server.counters.refusals
            gate = running_gatekeeper(actx)
            assert gate is not None and sum(gate.admitted.values()) >= 1 and not gate.denied
        finally:
            await client.close()
            await server.close()
            stop_gatekeeper(actx)

    run_async(body(), 20)


def test_client_with_a_key_outside_the_roster_gets_nothing_and_is_counted(keyring, actx, run_async):
    st = state()

    async def body():
        d = make_directory("tcp", [0, 1, 2])
        server = await secure_server(actx, d, keyring.for_peer(SERVER), st)
        pub, sec = zmq.curve_keypair()  # a valid CURVE key, but not one of the roster's
        stranger = Transport(actx, CLIENT, d, expect=schema_of(st),
                             security=CurveKeys(pub, sec, {SERVER: keyring.public[SERVER]}))
        honest = Transport(actx, 2, d, expect=schema_of(st), security=keyring.for_peer(2))
        try:
            r = await stranger.pull(SERVER, timeout=1.0)
            assert not r.ok and r.reason == "unreachable" and r.message is None  # no handshake, no connection
            assert await wait_for(lambda: server.counters.refusals["auth"] >= 1)
            assert running_gatekeeper(actx).denied[pub] >= 1
            assert server.counters.msgs_in == 0 and server.counters.served == 0  # not one request got in
            assert (await honest.pull(SERVER, timeout=5)).ok  # the roster peer still pulls
        finally:
            for t in (stranger, honest, server):
                await t.close()
            stop_gatekeeper(actx)

    run_async(body(), 20)


def test_plaintext_and_wrong_server_key_clients_cannot_talk_to_a_secure_peer(keyring, actx, run_async):
    st = state()

    async def body():
        d = make_directory("tcp", [0, 1])
        server = await secure_server(actx, d, keyring.for_peer(SERVER), st)
        plain = actx.socket(zmq.DEALER)  # no CURVE at all: a valid request in clear text
        plain.setsockopt(zmq.LINGER, 0)
        plain.connect(d[SERVER])
        plain_t = Transport(actx, CLIENT, d, expect=schema_of(st))  # the transport without keys
        wrong = CurveKeys(keyring.public[CLIENT], keyring.secret[CLIENT], {SERVER: keyring.public[2]})
        impostor_t = Transport(actx, CLIENT, d, expect=schema_of(st), security=wrong)
        try:
            await plain.send_multipart(wire.encode_request(CLIENT, 1))
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(plain.recv_multipart(), 1.0)
            r = await plain_t.pull(SERVER, timeout=1.0)
            assert not r.ok and r.reason == "unreachable"
            r = await impostor_t.pull(SERVER, timeout=1.0)
            assert not r.ok and r.reason == "unreachable"
            assert await wait_for(lambda: server.counters.refusals["handshake"] >= 2)
            assert server.counters.msgs_in == 0 and server.counters.served == 0
        finally:
            plain.close(0)
            for t in (plain_t, impostor_t, server):
                await t.close()
            stop_gatekeeper(actx)

    run_async(body(), 20)


def test_secure_client_gets_nothing_from_a_plaintext_server(keyring, actx, run_async):
    """No downgrade: a CURVE client never accepts a server that does not prove the roster key."""
    st = state()

    async def body():
        d = make_directory("tcp", [0, 1])
        server = Transport(actx, SERVER, d, expect=schema_of(st))
        await server.start()
        server.publish(ModelPayload.build(st, step=1, version=1, n_samples=10))
        client = Transport(actx, CLIENT, d, expect=schema_of(st), security=keyring.for_peer(CLIENT))
        try:
            r = await client.pull(SERVER, timeout=1.0)
            assert not r.ok and r.reason == "unreachable"
            assert server.counters.msgs_in == 0
        finally:
            await client.close()
            await server.close()

    run_async(body(), 20)


async def _relay(host: str, port: int, seen: bytearray):
    """A tcp relay recording every byte in both directions (an eavesdropper on the link)."""

    async def pipe(reader, writer):
        try:
            while data := await reader.read(65536):
                seen.extend(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def handle(reader, writer):
        r2, w2 = await asyncio.open_connection(host, port)
        await asyncio.gather(pipe(reader, w2), pipe(r2, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("secure", [False, True], ids=["plaintext", "curve"])
def test_tensors_travel_encrypted_only_with_curve(secure, keyring, actx, run_async):
    """Through an eavesdropping relay: in clear text the model's bytes are on the wire
    verbatim; with CURVE not even 16 consecutive bytes of it are."""
    st = state(5)
    needle = [memoryview(t.numpy()).cast("B").tobytes() for t in st.values()]

    async def body():
        d = make_directory("tcp", [0, 1])
        keys = (lambda p: keyring.for_peer(p)) if secure else (lambda p: None)
        server = Transport(actx, SERVER, d, expect=schema_of(st), security=keys(SERVER))
        await server.start()
        server.publish(ModelPayload.build(st, step=1, version=1, n_samples=10))
        seen = bytearray()
        host, port = d[SERVER][len("tcp://"):].rsplit(":", 1)
        relay, rport = await _relay(host, int(port), seen)
        client = Transport(actx, CLIENT, {CLIENT: d[CLIENT], SERVER: f"tcp://127.0.0.1:{rport}"},
                           expect=schema_of(st), security=keys(CLIENT))
        try:
            r = await client.pull(SERVER, timeout=5)
            assert r.ok, r
            assert len(seen) > sum(map(len, needle))
            windows = [n[i:i + 16] for n in needle for i in range(0, len(n) - 16, 16)]
            found = sum(w in seen for w in windows)
            if secure:
                assert found == 0
            else:
                assert found == len(windows)
        finally:
            await client.close()
            await server.close()
            relay.close()
            stop_gatekeeper(actx)

    run_async(body(), 20)


def test_curve_needs_a_network_endpoint(keyring, actx, run_async):
    async def body():
        t = Transport(actx, 0, make_directory("inproc", [0, 1]), security=keyring.for_peer(0))
        with pytest.raises(TransportError, match="tcp or ipc"):
            await t.start()
        stop_gatekeeper(actx)

    run_async(body(), 10)


# ------------------------------------------------------------------ a whole roster run


def roster_text(experiment: str, hosts: list[tuple[str, int, list[int]]], security: str = "curve",
                extra: str = "") -> str:
    lines = [f'experiment = "{experiment}"', f'security = "{security}"', 'out = "run"', extra]
    for name, port, peers in hosts:
        lines += ["[[hosts]]", f'name = "{name}"', 'address = "127.0.0.1"', f"base_port = {port}", f"peers = {peers}"]
    return "\n".join(lines) + "\n"


TINY = """
name = "tiny-curve"
method = "dac"
schedule = "async"
peers = 4
rounds = 3
seed = 0
[data]
dataset = "digits"
n_train = 20
n_val = 10
test_per_class = 10
[train]
model = "mlp"
epochs = 1
test_every = 0
[policy]
n = 2
[network]
timeout_s = 5.0
"""


def free_port_range(n: int) -> int:
    """A base port with ``n`` consecutive free ports after it."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65000:
            continue
        socks = []
        try:
            for k in range(n):
                x = socket.socket()
                socks.append(x)
                x.bind(("127.0.0.1", base + k))
            return base
        except OSError:
            continue
        finally:
            for x in socks:
                x.close()
    raise RuntimeError("no free port range")


def cli(*args: str, cwd: Path, timeout: float = 90) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", "from zmqgossip.cli import app; app()", *args],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout, check=False)


def test_roster_with_curve_runs_to_completion_and_refuses_without_keys(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY)
    roster = tmp_path / "roster.toml"
    roster.write_text(roster_text("tiny.toml", [("a", free_port_range(2), [0, 1]), ("b", free_port_range(2), [2, 3])]))

    for args in (["run", "--roster", str(roster), "--quiet"], ["worker", "--roster", str(roster), "--host", "a"]):
        no_keys = CliRunner().invoke(app, args)
        assert no_keys.exit_code == 2, no_keys.output
        assert f"run `zmqgossip keys {roster}`" in no_keys.output
        assert not (tmp_path / "run").exists()  # refused before anything started

    assert CliRunner().invoke(app, ["keys", str(roster)]).exit_code == 0
    res = cli("run", "--roster", str(roster), "--quiet", "--no-report", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["failed_peers"] == []
    assert summary["peer_rounds"] == 4 * 3
    assert summary["pulls_ok"] >= 4 * 3 * 2 - 2 and summary["pulls_failed"] <= 2
    for r in (json.loads(p.read_text()) for p in (tmp_path / "run" / "peers").glob("peer-*.json")):
        assert r["status"] == "done"
        assert "auth" not in r["counters"]["refusals"] and "handshake" not in r["counters"]["refusals"]
