"""Basic-auth verification for the web config's ``basic_auth_users``: bcrypt, cached, and bounded.

bcrypt is slow by design (about 70 ms at cost 10), which is what makes it safe to store and what
makes it a denial-of-service lever: clients sending wrong passwords can keep every core busy and
every request thread waiting. So:

* every verdict is cached under a keyed digest of (user, hash, password), so a scrape with the
  right password pays bcrypt once per process;
* correct and wrong answers live in two separate LRU caches: wrong passwords, which anyone can
  send in any number, only ever evict other wrong passwords, never a valid scraper's entry;
* a cache hit takes one short lock and never waits behind a bcrypt computation;
* at most ``concurrency`` bcrypt checks run at once; a request that cannot get a slot within
  ``max_wait`` seconds gets ``BUSY`` (the server answers 503) instead of piling up threads, and
  so does one arriving while ``BCRYPT_MAX_WAITERS`` requests already wait.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import secrets
import struct
import threading
from collections import OrderedDict

import bcrypt

#: wrong (user, password) pairs remembered; anyone can fill this one, so it is the big one
NEGATIVE_CACHE_SIZE = 1024
#: right pairs remembered; only someone who knows a password can add to it
POSITIVE_CACHE_SIZE = 64
#: bcrypt checks running at once (bcrypt releases the GIL: this is cores, not threads)
BCRYPT_CONCURRENCY = 1
#: how long a request may wait for a bcrypt slot before it is answered 503
BCRYPT_MAX_WAIT_SECONDS = 2.0
#: requests that may wait for a bcrypt slot at once; more get 503 at once. Each waiter is a worker
#: thread: 150 pipelined wrong-password connections otherwise parked every thread for 2 s each.
BCRYPT_MAX_WAITERS = 4


class AuthVerdict(enum.Enum):
    ALLOWED = "allowed"
    DENIED = "denied"
    #: the password could not be checked now (bcrypt slots busy): try again later
    BUSY = "busy"


class _Lru:
    """A bounded mapping that forgets the least recently used key first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[bytes, None] = OrderedDict()

    def __contains__(self, key: bytes) -> bool:
        if key in self._items:
            self._items.move_to_end(key)
            return True
        return False

    def add(self, key: bytes) -> None:
        self._items[key] = None
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list[bytes]:
        return list(self._items)


class BasicAuth:
    """Checks ``Authorization: Basic`` headers against bcrypt hashes (user name -> hash)."""

    def __init__(
        self,
        users: dict[str, str],
        *,
        concurrency: int = BCRYPT_CONCURRENCY,
        max_wait: float = BCRYPT_MAX_WAIT_SECONDS,
        positive_size: int = POSITIVE_CACHE_SIZE,
        negative_size: int = NEGATIVE_CACHE_SIZE,
    ) -> None:
        self.users: dict[bytes, bytes] = {u.encode("utf-8"): h.encode("utf-8") for u, h in users.items()}
        # Unknown users are checked against a real user's hash (same cost, result forced to False),
        # so response times do not reveal which user names exist.
        self._decoy = self.users[min(self.users)] if self.users else b""
        self._key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._allowed = _Lru(positive_size)
        self._denied = _Lru(negative_size)
        self._slots = threading.BoundedSemaphore(concurrency)
        self._max_wait = max_wait
        self._waiters = threading.BoundedSemaphore(BCRYPT_MAX_WAITERS + concurrency)

    @property
    def enabled(self) -> bool:
        return bool(self.users)

    def cached_keys(self) -> list[bytes]:
        """Every cache key held (for tests: they must be digests, never passwords)."""
        with self._lock:
            return self._allowed.keys() + self._denied.keys()

    def verdict(self, header: str | None) -> AuthVerdict:
        """Whether an ``Authorization`` header grants access (always, when no users are set)."""
        if not self.users:
            return AuthVerdict.ALLOWED
        creds = parse_basic(header)
        if creds is None:
            return AuthVerdict.DENIED
        user, password = creds
        known_hash = self.users.get(user)
        hashed = known_hash if known_hash is not None else self._decoy
        # The cache key is a keyed digest of the attacker's input, so neither lookup timing nor a
        # memory dump of the cache says anything about the real password.
        # (length-prefixed, so no user name can be crafted to collide with another entry)
        framed = struct.pack(">II", len(user), len(hashed)) + user + hashed + password
        key = hmac.new(self._key, framed, hashlib.sha256).digest()
        with self._lock:
            if key in self._allowed:
                return AuthVerdict.ALLOWED
            if key in self._denied:
                return AuthVerdict.DENIED
        if not self._waiters.acquire(blocking=False):
            return AuthVerdict.BUSY
        try:
            if not self._slots.acquire(timeout=self._max_wait):
                return AuthVerdict.BUSY
            try:
                ok = bcrypt_check(password, hashed) and known_hash is not None
            finally:
                self._slots.release()
        finally:
            self._waiters.release()
        with self._lock:
            (self._allowed if ok else self._denied).add(key)
        return AuthVerdict.ALLOWED if ok else AuthVerdict.DENIED

    def authorize(self, header: str | None) -> bool:
        return self.verdict(header) is AuthVerdict.ALLOWED


def bcrypt_check(password: bytes, hashed: bytes) -> bool:
    try:
        return bool(bcrypt.checkpw(password, hashed))
    except ValueError:  # over 72 bytes, or a malformed hash
        return False


def parse_basic(header: str | None) -> tuple[bytes, bytes] | None:
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True)
    except ValueError:
        return None
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    return user, password
