"""Basic-auth verification: cached, LRU (not cleared wholesale), and bcrypt work bounded."""

from __future__ import annotations

import base64
import threading
import time

import bcrypt
import pytest

from exporter.web import auth as webauth
from exporter.web.auth import AuthVerdict, BasicAuth

# cost 4 keeps the unit tests fast; the format is the same as the operators' cost 10+
HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_verifications_are_cached_so_scrapes_stay_cheap(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = webauth.bcrypt_check

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append(password)
        return real(password, hashed)

    monkeypatch.setattr(webauth, "bcrypt_check", counting)
    auth = BasicAuth({"alice": HASH})
    for _ in range(5):
        assert auth.authorize(basic("alice", "s3cret")) is True
        assert auth.authorize(basic("alice", "nope")) is False
        assert auth.authorize(basic("ghost", "s3cret")) is False
    assert sorted(calls) == [b"nope", b"s3cret", b"s3cret"]  # once per distinct (user, password)
    assert b"s3cret" not in b"".join(auth.cached_keys())  # keys are keyed digests, not passwords


def test_wrong_passwords_never_evict_a_valid_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []

    def check(p: bytes, h: bytes) -> bool:
        calls.append(p)
        return p == b"s3cret"

    monkeypatch.setattr(webauth, "bcrypt_check", check)
    auth = BasicAuth({"alice": HASH}, negative_size=8)
    assert auth.authorize(basic("alice", "s3cret"))
    for i in range(100):  # far more wrong passwords than the cache holds
        assert not auth.authorize(basic("alice", f"guess-{i}"))
    assert auth.authorize(basic("alice", "s3cret"))
    assert calls.count(b"s3cret") == 1  # still cached
    assert len(auth.cached_keys()) == 1 + 8  # bounded, and trimmed one at a time (LRU)
    assert not auth.authorize(basic("alice", "guess-99"))  # most recent wrong ones are remembered
    assert calls.count(b"guess-99") == 1
    assert not auth.authorize(basic("alice", "guess-0"))  # the oldest was forgotten
    assert calls.count(b"guess-0") == 2


def test_a_cache_hit_never_waits_behind_bcrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    real = webauth.bcrypt_check

    def slow(password: bytes, hashed: bytes) -> bool:
        if password != b"s3cret":
            release.wait(10)
        return real(password, hashed)

    monkeypatch.setattr(webauth, "bcrypt_check", slow)
    auth = BasicAuth({"alice": HASH}, concurrency=1, max_wait=0.2)
    assert auth.authorize(basic("alice", "s3cret"))
    busy = threading.Thread(target=auth.verdict, args=(basic("alice", "wrong"),))
    busy.start()  # holds the only bcrypt slot
    try:
        time.sleep(0.05)
        start = time.perf_counter()
        assert auth.verdict(basic("alice", "s3cret")) is AuthVerdict.ALLOWED
        assert time.perf_counter() - start < 0.05
        # a new password cannot get a slot: BUSY after max_wait, not a pile of waiting threads
        start = time.perf_counter()
        assert auth.verdict(basic("alice", "another")) is AuthVerdict.BUSY
        assert 0.15 < time.perf_counter() - start < 1.0
    finally:
        release.set()
        busy.join()


def test_no_users_allows_everything_and_bad_headers_are_denied() -> None:
    assert BasicAuth({}).verdict(None) is AuthVerdict.ALLOWED
    auth = BasicAuth({"alice": HASH})
    for header in (None, "", "Bearer abc", "Basic !!!", "Basic " + base64.b64encode(b"no-colon").decode()):
        assert auth.verdict(header) is AuthVerdict.DENIED
