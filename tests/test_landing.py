"""The landing page answers an operator's first questions, from the real host and guests; /config
shows the effective configuration with every secret redacted."""

from __future__ import annotations

import base64
import html
import re
import subprocess
import sys
import time
from pathlib import Path

import bcrypt
from conftest import ROOT, RunningDaemon, free_port

from exporter.render.landing import REDACTED, redact, render_landing
from exporter.views.status import CanaryProfileStatus, GuestLine, HostStatus, QemuStatus, Status


def _text(fragment: str) -> str:
    """What a reader sees: tags dropped, entities decoded, whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", fragment)).split())


def _host_flags() -> set[str]:
    line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
    return set(line.split(":", 1)[1].split())


#: guests of "the rest of the machine": started before the test's own guest (lower PIDs, names that
#: sort first), each missing host features but not AES-NI, as a busy hypervisor's guests would be
FOREIGN_GUESTS = 6


def test_landing_page_names_guests_missing_host_features(start_daemon, qemu_guest) -> None:
    """The guest without AES-NI is named above the host section however many other guests miss
    features: the test starts six such guests first, so it also proves it does not depend on what
    else runs on the machine (it failed on any host that already ran five such guests)."""
    for i in range(FOREIGN_GUESTS):
        qemu_guest("-cpu", "Westmere", name=f"aaa-foreign-{i}")
    guest = qemu_guest("-cpu", "qemu64", name="landing-web01")
    d = start_daemon("--no-canary.enabled", wait_ready=True)
    deadline = time.monotonic() + 30
    while True:
        code, body = d.get("/")
        line = _text(
            next((part for part in body.split("<tr>") if '<td class="name">landing-web01</td>' in part), "")
        )
        if "missing" in line or "gets every" in line or time.monotonic() > deadline:
            break
        time.sleep(0.5)  # the model expansion resolves in the background
    assert code == 200
    page = _text(body.split("</style>", 1)[1])
    assert page.index("Problems") < page.index("Host") < page.index("Guests")
    assert "AES-NI used by the kernel" in page and "AES-NI flag" in page
    assert f"landing-web01 {guest.pid} -cpu qemu64 (tcg) x86-64-v1" in line, line
    if "aes" in _host_flags():
        assert "missing aes," in line, line
        assert "landing-web01" in page.split("Host")[0]


def test_config_view_redacts_secrets(tmp_path: Path) -> None:
    password = "correct horse"
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    web = tmp_path / "web.yml"
    web.write_text(
        f"basic_auth_users:\n  alice: '{hashed}'\n"
        "http_server_config:\n  headers:\n    X-Frame-Options: deny\n"
    )
    port = free_port()
    log = tmp_path / "daemon.log"
    # started by hand: the start_daemon fixture waits for an unauthenticated /-/healthy
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "exporter",
                "serve",
                f"--web.listen-address=127.0.0.1:{port}",
                f"--web.config.file={web}",
                f"--path.state-dir={tmp_path / 'state'}",
                "--no-canary.enabled",
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
    try:
        d = RunningDaemon(proc, port, log, tmp_path / "state")
        auth = {"Authorization": "Basic " + base64.b64encode(f"alice:{password}".encode()).decode()}
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, d.log()
            try:
                code, body = d.get("/config", headers=auth)
                break
            except OSError:
                assert time.monotonic() < deadline, d.log()
                time.sleep(0.2)
        assert d.get("/config")[0] == 401
    finally:
        d.stop()
    assert code == 200, body
    page = html.unescape(body)
    assert f"listen_address: 127.0.0.1:{port}" in page and str(web) in page
    assert "alice: " + REDACTED in page
    assert hashed not in page and hashed[:7] not in page
    assert "X-Frame-Options: deny" in page


def test_redact_keeps_paths_and_drops_secrets() -> None:
    data = {
        "tls_server_config": {"cert_file": "/etc/x/cert.pem", "key_file": "/etc/x/key.pem", "key": "inline"},
        "basic_auth_users": {"bob": "$2y$10$abcdefghijklmnopqrstuv"},
        "client": {"password": "hunter2", "bearer_token": "t", "note": "-----BEGIN PRIVATE KEY-----\nMII"},
        "list": ["$2b$04$xyz", "plain"],
    }
    out = redact(data)
    assert out["tls_server_config"] == {
        "cert_file": "/etc/x/cert.pem",
        "key_file": "/etc/x/key.pem",
        "key": REDACTED,
    }
    assert out["basic_auth_users"] == {"bob": REDACTED}
    assert out["client"] == {"password": REDACTED, "bearer_token": REDACTED, "note": REDACTED}
    assert out["list"] == [REDACTED, "plain"]


def _guest(name: str, **kw) -> GuestLine:
    base = dict(
        name=name,
        pid=1,
        model="qemu64",
        accel="tcg",
        migratable=True,
        state="known",
        level=1,
        missing=(),
        hazards=(),
    )
    return GuestLine(**{**base, **kw})


def test_problems_come_first_and_critical_before_warning() -> None:
    status = Status(
        host=HostStatus("AMD EPYC", 2, 2, "aes-generic", aesni_active=False),
        qemu=QemuStatus(
            "qemu", "7.2", {"kvm": False, "tcg": True}, {"kvm": "failed to set MSR"}, 38, 132, "max", ()
        ),
        guests=(
            _guest("web01", missing=("aes", "avx2", "avx", "xsave")),
            _guest("db01", model="SandyBridge,avx2=on,xsave=off", level=2, hazards=(("avx", ("xsave",)),)),
            _guest("new01", state="pending", level=None),
        ),
        collectors={"cpu": (True, 0.002, None), "crypto": (False, 0.001, "cannot read /proc/crypto")},
        canary=(
            CanaryProfileStatus("aesni", "success", 1.0),
            CanaryProfileStatus("noaesni", "timeout", 2.0, "no result in 300 s"),
        ),
    )
    titles = [(p.severity, p.title) for p in status.problems]
    assert titles == [
        ("critical", "AES-NI is not used by the host kernel"),
        ("critical", "guest db01 gets features without their prerequisites"),
        ("critical", "canary noaesni failed: timeout"),
        ("warning", "1 guest does not get AES-NI"),
        ("warning", "1 guest misses host CPU features"),
        ("warning", "KVM is not usable: guests run under software emulation (TCG)"),
        ("warning", "collector crypto failed"),
    ]
    page = render_landing(status)
    text = _text(page.split("</style>", 1)[1])
    assert text.index("Problems (7)") < text.index("Host")
    assert "missing aes, avx2 + 2 more" in text
    assert "avx without xsave" in text and "x86-64-v2" in text
    assert "new01" in text and "not known yet" in text  # never "missing every feature"
    assert '<span class="no">NO</span>' in page and '<span class="yes">yes</span>' in page


def test_no_problems_says_so() -> None:
    status = Status(host=HostStatus("AMD EPYC", 2, 2, "aes-aesni", aesni_active=True), guests=())
    assert status.problems == ()
    assert "No problems found." in render_landing(status)


def test_a_guest_name_that_is_not_utf8_is_shown_not_fatal() -> None:
    """/proc gives a -name of arbitrary bytes as surrogate escapes; the page must still encode."""
    name = b"vm-\xff\xfe-x".decode("utf-8", "surrogateescape")
    page = render_landing(Status(guests=(_guest(name, missing=("aes",)),)))
    assert "vm-\ufffd\ufffd-x" in page.encode("utf-8").decode()
