"""CURVE security: the roster's key pairs and the ZAP gatekeeper that admits only them.

With ``security = "curve"`` in a roster every peer has a CURVE key pair
(``zmqgossip keys ROSTER`` writes them, :func:`generate_keys`).  A peer's inbox (ROUTER)
is a CURVE server with its own key pair; its pulls go out through DEALERs that are CURVE
clients, each authenticating with the puller's key pair against the public key of the
peer it pulls.  Every message is encrypted, and a :class:`Gatekeeper` (a ZAP handler,
one per ZeroMQ context, i.e. per process) lets a client in only if its public key is one
of the roster's.  A client with another key, no key (plaintext) or the wrong server key
never completes the handshake: it gets nothing, not even an error reply.

Key files are ZeroMQ certificates (``zmq.auth``): ``peer-7.key`` holds peer 7's public
key, ``peer-7.key_secret`` its public and secret key.  A host needs every public key and
the secret keys of its own peers only.
"""

from __future__ import annotations

import os
import stat
import weakref
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

from .config import ConfigError

KEY_LEN = 40  # a z85-encoded CURVE key


class SecurityError(ConfigError):
    """Keys that are missing, malformed or unsafe; the message says what to do."""


@dataclass(frozen=True)
class CurveKeys:
    """What one peer's transport needs: its own key pair and the roster's public keys."""

    public: bytes  # z85
    secret: bytes  # z85
    peers: Mapping[int, bytes]  # peer id -> z85 public key: the only clients admitted

    def server_key(self, peer: int) -> bytes | None:
        return self.peers.get(peer)


@dataclass(frozen=True)
class KeyRing:
    """The keys one host loaded: every roster peer's public key, its own peers' secrets."""

    public: Mapping[int, bytes]
    secret: Mapping[int, bytes]
    folder: Path

    def for_peer(self, pid: int) -> CurveKeys:
        if pid not in self.secret:
            raise SecurityError(f"no secret key for peer {pid} was loaded from {self.folder}")
        return CurveKeys(self.public[pid], self.secret[pid], dict(self.public))


# ---------------------------------------------------------------------- key files


def public_path(folder: Path, pid: int) -> Path:
    return Path(folder) / f"peer-{pid}.key"


def secret_path(folder: Path, pid: int) -> Path:
    return Path(folder) / f"peer-{pid}.key_secret"


def keys_folder(keys: str | None, roster_path: str | Path) -> Path:
    """The roster's ``keys`` folder (default ``keys/``), relative to the roster file."""
    folder = Path(keys or "keys").expanduser()
    return folder if folder.is_absolute() else Path(roster_path).resolve().parent / folder


def generate_keys(folder: str | Path, peers: Iterable[int], *, force: bool = False) -> list[Path]:
    """One CURVE key pair per peer in ``folder`` (mode 0700; secret files 0600).

    Refuses to overwrite any existing key file unless ``force``.  Returns the files written.
    """
    folder = Path(folder)
    peers = sorted({int(p) for p in peers})
    existing = [p for pid in peers for p in (public_path(folder, pid), secret_path(folder, pid)) if p.exists()]
    if existing and not force:
        raise SecurityError(
            f"{len(existing)} key files already exist in {folder} (e.g. {existing[0].name}); "
            "pass --force to replace them (every host then needs the new public keys)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    written: list[Path] = []
    old = os.umask(0o077)  # no window in which a secret file is readable by others
    try:
        for pid in peers:
            for p in (public_path(folder, pid), secret_path(folder, pid)):
                if p.exists():
                    p.unlink()
            pub, sec = zmq.auth.create_certificates(str(folder), f"peer-{pid}")
            os.chmod(sec, 0o600)
            os.chmod(pub, 0o644)  # public keys may be read by anyone
            written += [Path(pub), Path(sec)]
    finally:
        os.umask(old)
    return written


def _read_key(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        pub, sec = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise SecurityError(f"cannot read CURVE key file {path}: {e}") from None
    if not pub or len(pub) != KEY_LEN or (secret and (not sec or len(sec) != KEY_LEN)):
        raise SecurityError(f"{path} is not a CURVE {'secret ' if secret else ''}key file (regenerate with `zmqgossip keys`)")
    return pub, sec


def load_keyring(folder: str | Path, peers: Sequence[int], own: Sequence[int], roster: str = "ROSTER") -> KeyRing:
    """Every peer's public key and the secret keys of ``own`` from ``folder``.

    Raises :class:`SecurityError` naming the missing file and the command that writes it.
    Secret key files readable by group or others are refused.
    """
    folder = Path(folder)
    hint = f"run `zmqgossip keys {roster}` to generate them"
    if not folder.is_dir():
        raise SecurityError(f"security = \"curve\" but the keys folder {folder} does not exist: {hint}")
    public: dict[int, bytes] = {}
    secret: dict[int, bytes] = {}
    for pid in peers:
        path = public_path(folder, pid)
        if not path.is_file():
            raise SecurityError(f"no CURVE public key for peer {pid} ({path} is missing): {hint}")
        public[pid] = _read_key(path, secret=False)[0]
    for pid in own:
        path = secret_path(folder, pid)
        if not path.is_file():
            raise SecurityError(f"no CURVE secret key for peer {pid} ({path} is missing): {hint}, "
                                f"and copy each host's own peer-N.key_secret files to it")
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise SecurityError(f"{path} is readable by others (mode {mode:04o}): `chmod 600 {path}`")
        pub, sec = _read_key(path, secret=True)
        if pub != public[pid]:
            raise SecurityError(f"{path} and {public_path(folder, pid)} hold different public keys for peer {pid}")
        assert sec is not None
        secret[pid] = sec
    return KeyRing(public, secret, folder)


# ---------------------------------------------------------------------- ZAP


class Gatekeeper(AsyncioAuthenticator):
    """The ZAP handler of one context: admits CURVE clients whose public key is allowed.

    Every ZeroMQ context has at most one (it binds ``inproc://zeromq.zap.01``); it must run
    before a CURVE server socket of that context accepts its first connection.  Admitted
    and denied handshakes are counted here, by client key; each transport also counts the
    failed handshakes on its own inbox (``refusals["auth"]``, ``refusals["handshake"]``).
    """

    def __init__(self, ctx: zmq.Context, allowed: Iterable[bytes] = ()) -> None:
        super().__init__(ctx)
        self.allowed: set[bytes] = set(allowed)
        self.admitted: Counter = Counter()
        self.denied: Counter = Counter()
        self.configure_curve_callback("*", self)

    def callback(self, domain: str, key: bytes) -> bool:
        """Called by the authenticator with the client's z85 public key."""
        if key in self.allowed:
            self.admitted[key] += 1
            return True
        self.denied[key] += 1
        return False


_GATES: weakref.WeakKeyDictionary[zmq.Context, Gatekeeper] = weakref.WeakKeyDictionary()


def gatekeeper(ctx: zmq.Context, allowed: Iterable[bytes] = ()) -> Gatekeeper:
    """The context's running gatekeeper (started on first use), now also admitting ``allowed``.

    Call from within the event loop that serves the context's sockets.
    """
    g = _GATES.get(ctx)
    if g is None:
        g = Gatekeeper(ctx, allowed)
        g.start()
        _GATES[ctx] = g
    else:
        g.allowed.update(allowed)
    return g


def stop_gatekeeper(ctx: zmq.Context) -> None:
    """Stop and forget the context's gatekeeper, if any (before ``ctx.term()``)."""
    g = _GATES.pop(ctx, None)
    if g is not None:
        g.stop()


def running_gatekeeper(ctx: zmq.Context) -> Gatekeeper | None:
    return _GATES.get(ctx)
