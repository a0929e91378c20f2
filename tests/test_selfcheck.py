"""The canary self-check: the exporter's prediction for a canary's CPU spec vs what the guest reported.

Unit tests use a table knowledge source (QEMU 7.2's TCG answers, tests/support/guests.py); the last
test runs the real daemon with real canaries: both default profiles and a hazardous one show 0
mismatches, and the hazardous profile's paused twin is reported as a hazard.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import parse_metrics, sample
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry
from support.canary import canary_image, override_init
from support.guests import TCG_MAX as _TCG_MAX
from support.guests import TCG_QEMU64 as _TCG_QEMU64
from support.guests import FakeFacts, FakeKnowledge

from exporter.canary.model import CanaryResult
from exporter.canary.results.store import CanaryStore
from exporter.canary.selfcheck import Observation, SelfCheck, compare, predict
from exporter.collectors.canary_selfcheck import CanarySelfcheckCollector
from exporter.errors import UnknownCpuModel
from exporter.features import watchlist
from exporter.guests.effective import verdict
from exporter.levels import LEVEL_FEATURES

WATCH = watchlist()
#: the support tables list watched features only; with the level features QEMU 7.2 gives under TCG
#: (qemu64: the baseline plus cx16 and lahf_lm; max: everything up to x86-64-v3) levels are real
TCG_QEMU64 = _TCG_QEMU64 | set(LEVEL_FEATURES[1]) | {"cx16", "lahf_lm"}
TCG_MAX = _TCG_MAX | {f for n in (1, 2, 3) for f in LEVEL_FEATURES[n]}


def tcg_knowledge() -> FakeKnowledge:
    return FakeKnowledge(
        expansions={("max", "tcg"): TCG_MAX, ("qemu64", "tcg"): TCG_QEMU64},
        host_facts=FakeFacts(TCG_MAX, "max"),
    )


INIT = Path(__file__).resolve().parent.parent / "exporter" / "canary" / "image" / "guest" / "init"


def _result(
    profile: str = "noaesni",
    cpu: str = "max,-aes",
    flags: frozenset[str] | None = None,
    *,
    result: str = "success",
    message: str = "",
    glibc: int | None = 3,
    at: float = 1_764_000_000.0,
) -> CanaryResult:
    return CanaryResult(
        profile=profile,
        result=result,
        started_at=at - 10,
        finished_at=at,
        message=message,
        cpu_spec=cpu,
        accel="tcg",
        cpu_flags=sorted(flags or ()),
        glibc_level=glibc,
    )


def _shown(features: frozenset[str]) -> frozenset[str]:
    """What a guest with these effective features shows, per the model (the agreeing case)."""
    return verdict(features).usable


# ---------------------------------------------------------------------- compare


def test_agreeing_guest_has_no_mismatches() -> None:
    prediction = verdict(TCG_MAX)
    assert compare(prediction, Observation(_shown(TCG_MAX), prediction.level, "success"), WATCH) == ()


def test_feature_and_level_mismatches() -> None:
    prediction = verdict(TCG_MAX)
    seen = (_shown(TCG_MAX) - {"xsaveopt"}) | {"avx512f"}
    out = compare(prediction, Observation(seen, prediction.level + 1, "success"), WATCH)
    assert {(m.kind, m.subject, m.predicted, m.observed) for m in out} == {
        ("feature", "xsaveopt", "1", "0"),
        ("feature", "avx512f", "0", "1"),
        ("level", "glibc", str(prediction.level), str(prediction.level + 1)),
    }
    # a guest that did not report glibc's verdict says nothing about the level
    assert [m.kind for m in compare(prediction, Observation(seen, None, "success"), WATCH)] == ["feature"] * 2


def test_hazards_are_compared_through_the_guests_flags() -> None:
    """QEMU hides xsaveopt without xsave; a model that forgot it would predict no hazard but the
    guest's flags (through the same table) would still show avx without xsave."""
    no_xsave = TCG_MAX - {"xsave"}
    prediction = verdict(no_xsave)
    assert {h.feature for h in prediction.hazards} >= {"avx", "avx2"}
    agree = compare(
        prediction, Observation(_shown(no_xsave), None, "guest_panic", "invalid opcode: 0000"), WATCH
    )
    assert agree == ()
    healthy = verdict(TCG_MAX)
    out = compare(healthy, Observation(_shown(no_xsave), None, "success"), WATCH)
    assert ("hazard", "avx") in {(m.kind, m.subject) for m in out}


def test_crash_verdict() -> None:
    aes = TCG_QEMU64 | {"aes"}  # qemu64,+aes: aesni-intel runs SSSE3 code
    crashing = verdict(aes)
    panic = "guest kernel crashed: invalid opcode: 0000 [#1] PREEMPT SMP NOPTI"
    assert compare(crashing, Observation(_shown(aes), None, "guest_panic", panic), WATCH) == ()
    ran = compare(crashing, Observation(_shown(aes), None, "success"), WATCH)
    assert [(m.kind, m.predicted, m.observed) for m in ran] == [("crash", "crash", "ran cleanly")]
    # a timeout decides nothing
    assert compare(crashing, Observation(_shown(aes), None, "timeout"), WATCH) == ()

    healthy = verdict(TCG_MAX)
    out = compare(healthy, Observation(_shown(TCG_MAX), None, "guest_panic", panic), WATCH)
    assert [(m.kind, m.subject) for m in out] == [("crash", "aesni-intel")]
    oom = "guest kernel crashed: Kernel panic - not syncing: Out of memory"
    assert compare(healthy, Observation(_shown(TCG_MAX), None, "guest_panic", oom), WATCH) == ()


def test_latent_hazard_without_aes_is_not_a_crash_prediction() -> None:
    """max,-xsave,-aes: avx without xsave, but the canary's workload never loads aesni-intel."""
    latent = TCG_MAX - {"xsave", "aes"}
    prediction = verdict(latent)
    assert prediction.hazards
    assert compare(prediction, Observation(_shown(latent), None, "success"), WATCH) == ()


# ---------------------------------------------------------------------- SelfCheck


def test_predict_uses_the_running_guest_resolution() -> None:
    k = tcg_knowledge()
    p = predict(k, "max,-aes,+avx512f", accel="tcg", binary=None)
    assert p is not None
    assert "aes" not in p.usable and "avx" in p.usable
    assert "avx512f" not in p.usable  # TCG cannot provide it: filtered like for a running guest
    assert predict(k, "Skylake-Client", accel="tcg", binary=None) is None  # pending, never blocks
    with pytest.raises(UnknownCpuModel):
        predict(
            FakeKnowledge(failures={("Nope", "tcg"): UnknownCpuModel("no Nope")}),
            "Nope",
            accel="tcg",
            binary=None,
        )


def test_selfcheck_compares_once_and_logs_each_mismatch_once(caplog: pytest.LogCaptureFixture) -> None:
    k = tcg_knowledge()
    check = SelfCheck(k, WATCH)
    features = TCG_MAX - {"aes"}
    good = _result(flags=_shown(features), glibc=verdict(features).level)
    first = check.check(good)
    assert first is not None and first.mismatches == ()
    asked = len(k.asked)
    assert check.check(good) is first and len(k.asked) == asked  # computed once per result

    caplog.set_level(logging.WARNING, logger="exporter.canary.selfcheck")
    bad = _result(
        flags=_shown(features) - {"xsaveopt"}, glibc=verdict(features).level, at=good.finished_at + 900
    )
    assert [str(m) for m in check.check(bad).mismatches] == ["feature xsaveopt: predicted 1, guest 0"]  # type: ignore[union-attr]
    again = _result(
        flags=_shown(features) - {"xsaveopt"}, glibc=verdict(features).level, at=bad.finished_at + 900
    )
    assert check.check(again).mismatches  # type: ignore[union-attr]
    logged = [r for r in caplog.records if "contradicts" in r.getMessage()]
    assert len(logged) == 1
    assert logged[0].fields["feature"] == "xsaveopt" and logged[0].fields["profile"] == "noaesni"  # type: ignore[attr-defined]

    # a tick that booted nothing keeps the last comparison
    skipped = CanaryResult("noaesni", "skipped_busy", again.finished_at + 900, again.finished_at + 900)
    assert check.check(skipped) is check.last("noaesni") is not None


def test_selfcheck_unknown_model_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    k = FakeKnowledge(failures={("Nope", "tcg"): UnknownCpuModel("QEMU does not know Nope")})
    check = SelfCheck(k, WATCH)
    caplog.set_level(logging.WARNING, logger="exporter.canary.selfcheck")
    for _ in range(3):
        assert check.check(_result(cpu="Nope", flags=frozenset({"sse2"}))) is None
    assert len([r for r in caplog.records if "cannot predict" in r.getMessage()]) == 1


def test_glibc_level_from_a_damaged_state_is_ignored() -> None:
    r = _result(flags=frozenset({"sse2"}))
    r.glibc_level = "3"  # type: ignore[assignment]
    assert Observation.from_result(r).glibc_level is None  # type: ignore[union-attr]
    assert Observation.from_result(_result(flags=frozenset())) is None


# ---------------------------------------------------------------------- collector


def test_collector_exports_from_the_store(tmp_path: Path) -> None:
    store = CanaryStore(tmp_path, profiles=["aesni", "noaesni", "qemu64-aes"])
    features = TCG_MAX - {"aes"}
    store.record(_result(flags=_shown(features), glibc=verdict(features).level))
    aes = TCG_QEMU64 | {"aes"}
    store.record(
        _result(
            "qemu64-aes",
            "qemu64,+aes",
            _shown(aes),
            result="guest_panic",
            glibc=1,
            message="invalid opcode: 0000",
        )
    )
    collector = CanarySelfcheckCollector(store, SelfCheck(tcg_knowledge(), WATCH))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    m = parse_metrics(generate_latest(registry).decode())
    assert sample(m, "kvmcpu_canary_model_mismatches", profile="noaesni") == 0
    assert sample(m, "kvmcpu_canary_model_mismatches", profile="qemu64-aes") == 0
    assert sample(m, "kvmcpu_canary_model_mismatches", profile="aesni") is None  # never ran
    level = verdict(features).level
    for source in ("predicted", "guest", "glibc"):
        assert sample(m, "kvmcpu_canary_x86_64_level", profile="noaesni", source=source) == level
        assert (
            sample(m, "kvmcpu_canary_x86_64_level", profile="qemu64-aes", source=source) == verdict(aes).level
        )
    assert sample(m, "kvmcpu_canary_cpu_hazards", profile="noaesni") == 0
    assert (sample(m, "kvmcpu_canary_cpu_hazards", profile="qemu64-aes") or 0) >= 1
    assert sample(m, "kvmcpu_canary_model_check_timestamp_seconds", profile="noaesni") == 1_764_000_000.0

    # the guest disagrees: counted, and each contradiction named
    store.record(_result(flags=_shown(features) | {"avx512f"}, glibc=level, at=1_764_000_900.0))
    m = parse_metrics(generate_latest(registry).decode())
    assert sample(m, "kvmcpu_canary_model_mismatches", profile="noaesni") == 1
    assert (
        sample(m, "kvmcpu_canary_model_mismatch", profile="noaesni", kind="feature", subject="avx512f") == 1
    )
    # a skipped tick keeps the last comparison
    store.record(CanaryResult("noaesni", "skipped_busy", 1_764_001_800.0, 1_764_001_800.0))
    m = parse_metrics(generate_latest(registry).decode())
    assert sample(m, "kvmcpu_canary_model_mismatches", profile="noaesni") == 1
    assert CanarySelfcheckCollector(None, SelfCheck(tcg_knowledge(), WATCH)).comparisons() == {}


# ---------------------------------------------------------------------- the real daemon


@pytest.fixture
def image_dir() -> Iterator[Path]:
    """Outside pytest's tmp dir (a concurrent pytest session resets it to 0700; the canary runs as nobody)."""
    d = Path(tempfile.mkdtemp(prefix="kvmcpu-sc-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.slow
def test_daemon_defaults_show_no_mismatch_and_a_hazardous_profile_is_predicted(
    start_daemon, qemu_guest, tmp_path: Path, image_dir: Path
) -> None:
    image = override_init(canary_image(), image_dir, INIT.read_text())
    twin = f"sc-twin-{tmp_path.name[-12:]}"
    qemu_guest("-cpu", "qemu64,+aes", name=twin)  # a running (paused) guest with the hazardous spec
    cfg = {
        "qemu": {"accelerators": ["tcg"]},
        "canary": {
            "ciphers": ["aes-xts-plain"],
            "size_mib": 1,
            "rounds": 1,
            "interval_seconds": 2,
            "jitter_seconds": 0,
            "timeout_seconds": 120.0,
            "busy_load_per_core": 1000.0,
            "busy_cpu_percent": 100.0,
            "duty_cycle_percent": 100.0,
            "kernel": str(image.kernel),
            "initrd": str(image.initrd),
            "profiles": [
                {"name": "aesni", "cpu": "auto", "expects_aesni": True},
                {"name": "noaesni", "cpu": "auto,-aes", "expects_aesni": False},
                {"name": "qemu64-aes", "cpu": "qemu64,+aes", "accel": "tcg"},
            ],
        },
    }
    path = tmp_path / "config.yml"
    path.write_text(json.dumps(cfg))
    d = start_daemon(f"--config.file={path}")
    profiles = ("aesni", "noaesni", "qemu64-aes")
    m = d.wait_for(
        lambda m: (
            m
            if all(sample(m, "kvmcpu_canary_model_mismatches", profile=p) is not None for p in profiles)
            and sample(m, "kvmcpu_guest_cpu_hazards", guest=twin) is not None
            else None
        ),
        timeout=240,
    )
    for p in profiles:
        assert sample(m, "kvmcpu_canary_model_mismatches", profile=p) == 0, (p, d.log()[-3000:])
        levels = {
            s: sample(m, "kvmcpu_canary_x86_64_level", profile=p, source=s)
            for s in ("predicted", "guest", "glibc")
        }
        assert len(set(levels.values())) == 1 and None not in levels.values(), (p, levels)
    assert (sample(m, "kvmcpu_canary_runs_total", profile="aesni", result="success") or 0) >= 1
    assert (sample(m, "kvmcpu_canary_runs_total", profile="noaesni", result="success") or 0) >= 1
    # issue 11 item 4: the hazardous profile panics, and the exporter predicted it both for the
    # canary and for the running guest with the same spec
    assert (sample(m, "kvmcpu_canary_runs_total", profile="qemu64-aes", result="guest_panic") or 0) >= 1
    assert (sample(m, "kvmcpu_canary_cpu_hazards", profile="qemu64-aes") or 0) >= 1
    assert sample(m, "kvmcpu_canary_cpu_hazards", profile="aesni") == 0
    assert (sample(m, "kvmcpu_guest_cpu_hazards", guest=twin) or 0) >= 1
    config = next(
        dict(lbl)["cpu_config"] for (n, lbl) in m if n == "kvmcpu_guest_info" and dict(lbl)["guest"] == twin
    )
    hazard_features = {
        dict(lbl)["feature"]
        for (n, lbl) in m
        if n == "kvmcpu_guest_config_hazard" and dict(lbl)["cpu_config"] == config
    }
    assert "aes" in hazard_features
    assert "contradicts the exporter's CPU model" not in d.log()
    assert "Traceback" not in d.log()
