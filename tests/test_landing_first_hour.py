"""The landing page's first hour (issue 22): it leads with what an operator acts on and names the
guests concerned, shows each guest's full ``-cpu`` switches and an OS line for every guest."""

from __future__ import annotations

import html
import re

from exporter.levels import LEVEL_FEATURES
from exporter.render.landing import render_landing
from exporter.views.status import GuestLine, HostStatus, Status, os_line


def _text(fragment: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", fragment)).split())


def _upto(level: int) -> frozenset[str]:
    return frozenset(f for n, feats in LEVEL_FEATURES.items() if n <= level for f in feats)


def _guest(name: str, cpu: str, level: int, missing: tuple[str, ...], below: int | None = None) -> GuestLine:
    return GuestLine(
        name=name,
        pid=100,
        model=cpu.split(",")[0],
        accel="tcg",
        migratable=True,
        state="known",
        level=level,
        missing=missing,
        hazards=(),
        cpu=cpu,
        os_line=os_line(level, _upto(level)),
        below_level=below,
    )


def _tcg_fleet() -> Status:
    """21 guests under TCG: every one misses avx512f (TCG has none), one also misses aes."""
    guests = [_guest(f"web{i:02d}", "max", 3, ("avx512f",)) for i in range(20)]
    guests.insert(7, _guest("db-noaes", "Haswell-noTSX,-aes", 3, ("aes", "avx512f")))
    return Status(host=HostStatus("AMD EPYC", 2, 2, "aes-aesni", aesni_active=True), guests=tuple(guests))


def test_the_one_guest_without_aesni_is_named_first() -> None:
    status = _tcg_fleet()
    problems = [(p.severity, p.title, p.detail) for p in status.problems]
    assert problems[0][:2] == ("warning", "1 guest does not get AES-NI")
    assert problems[0][2].startswith("db-noaes (-cpu Haswell-noTSX,-aes): the host has it")
    # the feature every guest misses is summarised, not a list of 21 arbitrary names
    assert problems[1][:2] == ("warning", "21 guests miss host CPU features")
    assert problems[1][2] == "avx512f: every guest"
    page = _text(render_landing(status).split("</style>", 1)[1])
    assert page.index("1 guest does not get AES-NI") < page.index("Host")


def test_every_guest_row_has_its_full_cpu_switches_and_an_os_line() -> None:
    status = Status(
        guests=(
            _guest("old", "qemu64", 1, ("aes",), below=2),
            _guest("v2", "Westmere,+pcid", 2, (), below=3),
            _guest("v3", "Haswell-noTSX,-aes", 3, ("aes",)),
        )
    )
    page = render_landing(status)
    rows = {_text(r).split()[0]: _text(r) for r in page.split("<tr>") if '<td class="name">' in r}
    assert "-cpu Haswell-noTSX,-aes" in rows["v3"] and "-cpu Westmere,+pcid" in rows["v2"]
    assert (
        "OS: RHEL/CentOS Stream/Rocky/Alma/Oracle 9: ok; RHEL/CentOS Stream/Rocky/Oracle 10: ok" in rows["v3"]
    )
    assert (
        "OS: RHEL/CentOS Stream/Rocky/Alma/Oracle 9: ok; RHEL/CentOS Stream/Rocky/Oracle 10: needs v3 "
        "(missing avx, avx2, bmi1, bmi2, f16c, fma, abm, movbe, xsave)" in rows["v2"]
    )
    assert "Alma/Oracle 9: needs v2 (missing cx16" in rows["old"] and "Oracle 10: needs v3" in rows["old"]
    titles = [p.title for p in status.problems]
    assert "1 guest is below x86-64-v2 (RHEL/CentOS Stream/Rocky/Alma/Oracle 9 needs it)" in titles
    assert "1 guest is below x86-64-v3 (RHEL/CentOS Stream/Rocky/Oracle 10 needs it)" in titles
    below = next(p for p in status.problems if "below x86-64-v3" in p.title)
    assert below.detail == "v2 (-cpu Westmere,+pcid): the host could give it"
