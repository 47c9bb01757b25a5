"""What comes back from Redis is what the sidecar wrote there: an HMAC-SHA256 on every value it acts on.

Redis is shared: anyone who can write to it could otherwise decide what users are told. So every
value the sidecar serves or acts on from Redis carries a MAC under REDIS_SIGNING_KEY: cache
entries, single-flight outcomes, and job and batch logs (their metadata, each stream entry, a
batch's rendered inputs). A value whose MAC is missing or wrong is never used: a cache entry is a
miss, a flight outcome is ignored (the request asks the model itself), a job log ends its readers
with `error` (`job-log-tampered`) and `done`. Unsigned values (written by hand, or by a release
before issue 22) are treated the same way.

Each MAC covers the Redis key the value is stored under, not only the value (and, for one part
of a structure, which part: a stream entry's id, a hash field's name). Otherwise a valid entry
copied under another key (another user's record, another job, another question's flight) would
pass its check there. Every part is length-prefixed, so two different (key, value) pairs never
feed the MAC the same bytes.

Rotation without downtime: values are signed with REDIS_SIGNING_KEY and verified with it or with
REDIS_SIGNING_KEY_PREVIOUS (never signed with). See the README's Security section for the steps.

Not signed, on purpose: values that only coordinate and are never served (locks, leases, the
claim on a question, which is checked against the claimed job's signed metadata instead, the
batch set and cancel flags, rate-limit buckets, the hand-over nudge). Writing those can delay or
refuse work, which any writer to Redis can do anyway (by deleting keys); it cannot change an answer.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from collections import OrderedDict
from collections.abc import Callable

import structlog

log = structlog.get_logger("adapter.cache")

_LENGTH = struct.Struct(">I")
SEALED = b"H1"  # a sealed value: SEALED + MAC + the value (the tag tells unsigned values apart in the log)
MAC_SIZE = hashlib.sha256().digest_size


class Tampered(Exception):
    """A value failed its check: `unsigned` (no MAC at all) or `bad-signature`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Signer:
    """HMAC-SHA256 under the current key; verification also accepts the previous one (rotation)."""

    def __init__(self, key: str | bytes, previous: str | bytes | None = None) -> None:
        # One keyed object per key, copied per MAC: cheaper than keying a new HMAC each time.
        self._current = hmac.new(_bytes(key), digestmod=hashlib.sha256)
        self._accepted = [self._current] + ([hmac.new(_bytes(previous), digestmod=hashlib.sha256)] if previous else [])

    @classmethod
    def random(cls) -> Signer:
        """A key of one app alone: what an app built without REDIS_SIGNING_KEY uses (`adapter serve` with
        Redis refuses to start without one, as replicas must share it)."""
        return cls(secrets.token_bytes(32))

    def mac(self, key: str, *parts: bytes) -> bytes:
        return _mac(self._current, key, parts)

    def check(self, mac: bytes | None, key: str, *parts: bytes) -> None:
        """Raise `Tampered` unless `mac` is the MAC of (key, *parts) under an accepted key."""
        if not mac:
            raise Tampered("unsigned")
        for keyed in self._accepted:
            if hmac.compare_digest(mac, _mac(keyed, key, parts)):
                return
        raise Tampered("bad-signature")

    def seal(self, key: str, value: bytes, *context: bytes) -> bytes:
        """The value as stored under `key`: tag, MAC, value. `context`: what else the MAC binds it to."""
        return SEALED + self.mac(key, *context, value) + value

    def unseal(self, key: str, raw: bytes, *context: bytes) -> bytes:
        """The value stored under `key`, once its MAC checks out (else `Tampered`)."""
        if raw[:len(SEALED)] != SEALED or len(raw) < len(SEALED) + MAC_SIZE:
            raise Tampered("unsigned")
        start = len(SEALED) + MAC_SIZE
        value = raw[start:]
        self.check(raw[len(SEALED):start], key, *context, value)
        return value


def _bytes(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else key


def _mac(keyed: hmac.HMAC, key: str, parts: tuple[bytes, ...]) -> bytes:
    h = keyed.copy()
    name = key.encode()
    h.update(_LENGTH.pack(len(name)) + name)
    for part in parts:
        h.update(_LENGTH.pack(len(part)))
        h.update(part)
    return h.digest()


class Tampering:
    """Reports each value that failed its check once (per process): a `cache.tampered` log line with the
    Redis key and why, never the value, and `count(kind)` (the Prometheus counter).

    A tampered cache entry stays in Redis until a fresh answer overwrites it, and while the model is
    down every request reads it again: one line per entry, not per read. Remembered by fingerprint
    (key and a digest of the value), a bounded number of them.
    """

    def __init__(self, count: Callable[[str], None] = lambda kind: None, remember: int = 1024) -> None:
        self._count = count
        self._seen: OrderedDict[tuple[str, str, bytes], None] = OrderedDict()
        self._remember = remember

    def __call__(self, kind: str, key: str, reason: str, value: bytes, effect: str) -> None:
        fingerprint = (kind, key, hashlib.blake2b(value, digest_size=16).digest())
        if fingerprint in self._seen:
            self._seen.move_to_end(fingerprint)
            return
        self._seen[fingerprint] = None
        while len(self._seen) > self._remember:
            self._seen.popitem(last=False)
        self._count(kind)
        log.warning("cache.tampered", kind=kind, key=key, reason=reason, effect=effect)
