"""End to end: a healthy fleet fires nothing (issue 20, "a quiet first day").

A real Prometheus with ALL shipped rule files (recording, alerts, fleet) scrapes four simulated
hypervisors. Each serves what kvm-cpu-exporter serves for a healthy host: its host part comes from
the real cpu and crypto collectors reading a real CPU's /proc files (tests/fixtures/procfs/
broadwell-e5-2699v4: AES-NI on, aesni_intel selected), KVM and TCG proven, a small model catalog,
the canary's two default profiles succeeding with AES-NI used and a speedup of about 3x, every
collector succeeding; its guests are realistic platform configurations under KVM: Proxmox VE's
default ``x86-64-v2-AES`` and its ``x86-64-v3`` (qemu64 plus flags, PLATFORM.md) and Nova guests on
``-cpu Westmere``. For KVM guests these configurations have no hazard (aes without pclmulqdq faults
only under TCG), so no ``kvmcpu_guest_config_hazard`` series is served for them, as the exporter
does once hazards hold per accelerator.

Asserted: every rule evaluates without error, the rules saw the fleet (guest counts per
configuration, per-host required level, recommended model), and no alert is pending or firing.
Then one host starts two guests on Proxmox's old ``kvm64`` default (x86-64-v1, no AES-NI): exactly
one alert goes pending, per host and configuration, with the guest count as its value.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, parse_metrics
from support.host import exposition
from support.prometheus import RULE_FILES, PrometheusServer, wait_until

from exporter.config.model import SEED_CIPHERS
from exporter.features import DEFAULT_WATCHLIST

pytestmark = pytest.mark.slow

HOST_FIXTURE = "broadwell-e5-2699v4"
BASE = {"sse", "sse2", "pni", "cx16", "lahf_lm", "hypervisor"}
V2 = BASE | {"popcnt", "sse4_1", "sse4_2", "ssse3"}
V3 = V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "xsave", "abm"}
#: name -> (cpu_config, cpu_model, x86-64 level, features the guest OS sees, missing for the next level)
CONFIGS: dict[str, tuple[str, str, int, set[str], list[str]]] = {
    "pve-v2aes": (
        "qemu64-7a1c22e0",
        "qemu64",
        2,
        V2 | {"aes"},
        ["avx", "avx2", "bmi1", "bmi2", "f16c", "fma"],
    ),
    "pve-v3": ("qemu64-c4d1e9f2", "qemu64", 3, V3 | {"aes"}, []),
    "nova-westmere": (
        "Westmere-5b0e33a1",
        "Westmere",
        2,
        V2 | {"aes", "pclmulqdq"},
        ["avx", "avx2", "xsave"],
    ),
    "pve-kvm64": ("kvm64-0f9d8c7b", "kvm64", 1, BASE, ["popcnt", "sse4_1", "sse4_2", "ssse3"]),
}
#: host -> guests: (name, configuration)
FLEET: dict[str, list[tuple[str, str]]] = {
    "hv1": [("101", "pve-v2aes"), ("102", "pve-v2aes"), ("103", "pve-v3")],
    "hv2": [("201", "pve-v3"), ("202", "pve-v3"), ("203", "pve-v2aes")],
    "hv3": [("instance-0000002a", "nova-westmere"), ("instance-0000002b", "nova-westmere")],
    "hv4": [("instance-0000003c", "nova-westmere"), ("401", "pve-v2aes"), ("402", "pve-v3")],
}
CIPHERS = SEED_CIPHERS
COLLECTORS = ("cpu", "crypto", "qemu", "guests", "canary", "canary_selfcheck")
#: (model, vendor, level, features, supported by the Broadwell hosts)
MODELS = (
    ("Westmere-v1", "GenuineIntel", 2, 30, 1),
    ("Haswell-v4", "GenuineIntel", 3, 48, 1),
    ("Broadwell-v4", "GenuineIntel", 3, 52, 1),
    ("Skylake-Server-v4", "GenuineIntel", 4, 70, 0),
)


def host_part() -> tuple[str, set[str]]:
    """The real cpu and crypto collectors' output for the fixture CPU, and its features."""
    text = exposition(HOST_FIXTURE)
    features = {
        dict(labels)["feature"]
        for (name, labels), value in parse_metrics(text).items()
        if name == "kvmcpu_host_cpu_feature" and value == 1
    }
    return text, features


def lines(name: str, rows: list[tuple[dict[str, str], float]], kind: str = "gauge") -> list[str]:
    out = [f"# TYPE {name} {kind}"]
    for labels, value in rows:
        body = ",".join(f'{k}="{v}"' for k, v in labels.items())
        out.append(f"{name}{{{body}}} {value}" if body else f"{name} {value}")
    return out


def guest_part(guests: list[tuple[str, str]], host_features: set[str]) -> list[str]:
    used = sorted({c for _, c in guests})
    out: list[str] = []
    out += lines("kvmcpu_guests", [({}, float(len(guests)))])
    info, pid, known, level, hidden_n, hazards_n, vcpus, mem = ([] for _ in range(8))
    for i, (name, conf) in enumerate(guests):
        config, model, lvl, feats, _ = CONFIGS[conf]
        g = {"guest": name}
        uuid = f"6f1c2d3e-0000-4000-8000-{i:012d}"
        info.append(
            (
                {
                    "guest": name,
                    "uuid": uuid,
                    "cpu_model": model,
                    "accel": "kvm",
                    "migratable": "true",
                    "cpu_config": config,
                },
                1.0,
            )
        )
        pid.append((g, float(4000 + i)))
        known.append((g, 1.0))
        level.append((g, float(lvl)))
        hidden_n.append(
            (g, float(len([f for f in DEFAULT_WATCHLIST if f in host_features and f not in feats])))
        )
        hazards_n.append((g, 0.0))
        vcpus.append((g, 4.0))
        mem.append((g, 8 * 2.0**30))
    out += lines("kvmcpu_guest_info", info)
    out += lines("kvmcpu_guest_pid", pid)
    out += lines("kvmcpu_guest_cpu_model_known", known)
    out += lines("kvmcpu_guest_x86_64_level", level)
    out += lines("kvmcpu_guest_cpu_features_hidden", hidden_n)
    out += lines("kvmcpu_guest_cpu_hazards", hazards_n)
    out += lines("kvmcpu_guest_vcpus", vcpus)
    out += lines("kvmcpu_guest_memory_bytes", mem)
    feature, hidden, cfg_level, missing = [], [], [], []
    for conf in used:
        config, _, lvl, feats, miss = CONFIGS[conf]
        for f in DEFAULT_WATCHLIST:
            feature.append(({"cpu_config": config, "feature": f}, 1.0 if f in feats else 0.0))
            hidden.append(
                ({"cpu_config": config, "feature": f}, 1.0 if f in host_features and f not in feats else 0.0)
            )
        cfg_level.append(({"cpu_config": config}, float(lvl)))
        missing += [({"cpu_config": config, "feature": f}, 1.0) for f in miss]
    out += lines("kvmcpu_guest_config_cpu_feature", feature)
    out += lines("kvmcpu_guest_config_cpu_feature_hidden", hidden)
    out += lines("kvmcpu_guest_config_x86_64_level", cfg_level)
    out += lines("kvmcpu_guest_config_x86_64_level_missing", missing)
    # no kvmcpu_guest_config_hazard: none of these configurations has a hazard under KVM
    out += lines(
        "kvmcpu_guest_scan_errors_total",
        [({"reason": r}, 0.0) for r in ("parse_error", "read_error")],
        "counter",
    )
    return out


def qemu_part() -> list[str]:
    out = lines("kvmcpu_host_accelerator_usable", [({"accel": "kvm"}, 1.0), ({"accel": "tcg"}, 1.0)])
    out += lines("kvmcpu_host_exposable_x86_64_level", [({}, 3.0)])
    out += lines(
        "kvmcpu_host_cpu_model_usable", [({"model": m[0], "alias": ""}, float(m[4])) for m in MODELS]
    )
    # what the Broadwell hosts lack for the one model they do not support
    missing = {"Skylake-Server-v4": "avx512bw,avx512cd,avx512dq,avx512f,avx512vl,clwb,pku"}
    out += lines(
        "kvmcpu_host_cpu_model_supported",
        [
            ({"model": m[0], "alias": "", "vendor": m[1], "missing": missing.get(m[0], "")}, float(m[4]))
            for m in MODELS
        ],
    )
    out += lines(
        "kvmcpu_cpu_model_info", [({"model": m[0], "vendor": m[1], "alias_of": ""}, 1.0) for m in MODELS]
    )
    out += lines("kvmcpu_cpu_model_x86_64_level", [({"model": m[0]}, float(m[2])) for m in MODELS])
    out += lines("kvmcpu_cpu_model_features", [({"model": m[0]}, float(m[3])) for m in MODELS])
    out += lines(
        "kvmcpu_cpu_model_rank",
        [({"model": m[0], "vendor": m[1]}, m[2] * 1e6 + m[3] * 1e3 + i) for i, m in enumerate(MODELS)],
    )
    out += lines("kvmcpu_host_cpu_model_support_hash", [({}, 2826001537.0)])
    out += lines("kvmcpu_qemu_info", [({"binary": "/usr/bin/qemu-system-x86_64", "version": "9.2.0"}, 1.0)])
    return out


def canary_part(started: float, now: float) -> list[str]:
    ticks = float(int((now - started) // 5) + 10)  # a tick every 5 s of this test
    out: list[str] = []
    for profile, aes in (("aesni", 1.0), ("noaesni", 0.0)):
        p = {"profile": profile}
        out += lines("kvmcpu_canary_runs_total", [({**p, "result": r}, ticks if r == "success" else 0.0) for r in (
            "success", "timeout", "guest_panic", "boot_failure", "image_missing", "qemu_error", "skipped_busy"
        )], "counter")  # fmt: skip
        out += lines("kvmcpu_canary_budget_skips_total", [(p, 0.0)], "counter")
        out += lines("kvmcpu_canary_last_success_timestamp_seconds", [(p, now - 120)])
        out += lines("kvmcpu_canary_last_run_timestamp_seconds", [(p, now - 120)])
        out += lines("kvmcpu_canary_last_result_info", [({**p, "result": "success"}, 1.0)])
        out += lines("kvmcpu_canary_guest_cpu_feature", [({**p, "feature": "aes"}, aes)])
        out += lines("kvmcpu_canary_aesni_driver_used", [({**p, "cipher": c}, aes) for c in CIPHERS])
        driver = "{}-aesni" if aes else "{}(aes-generic)"
        out += lines(
            "kvmcpu_canary_crypto_driver_info",
            [({**p, "cipher": c, "driver": driver.format(c.split("-")[1])}, 1.0) for c in CIPHERS],
        )
        out += lines("kvmcpu_canary_model_mismatches", [(p, 0.0)])
        rate = 100e6 if aes else 35e6
        out += lines(
            "kvmcpu_canary_throughput_bytes_per_second_sum",
            [({**p, "cipher": c, "op": op}, ticks * 3 * rate) for c in CIPHERS for op in ("read", "write")],
            "counter",
        )
        out += lines(
            "kvmcpu_canary_throughput_bytes_per_second_count",
            [({**p, "cipher": c, "op": op}, ticks * 3) for c in CIPHERS for op in ("read", "write")],
            "counter",
        )
    for name, value in (("", 2.9), ("_lower", 2.6), ("_upper", 3.2)):
        out += lines(
            f"kvmcpu_canary_aesni_speedup_ratio{name}",
            [({"cipher": c, "op": op}, value) for c in CIPHERS for op in ("read", "write")],
        )
    out += lines("kvmcpu_canary_scheduler_up", [({}, 1.0)])
    out += lines("kvmcpu_canary_scheduler_errors_total", [({}, 0.0)], "counter")
    out += lines("kvmcpu_canary_state_write_errors_total", [({}, 0.0)], "counter")
    out += lines("kvmcpu_canary_duty_cycle_ratio", [({}, 0.4)])
    return out


def self_part() -> list[str]:
    out = lines("kvmcpu_scrape_collector_success", [({"collector": c}, 1.0) for c in COLLECTORS])
    out += lines("kvmcpu_scrape_collector_duration_seconds", [({"collector": c}, 0.002) for c in COLLECTORS])
    out += lines(
        "kvmcpu_scrape_collector_errors_total",
        [({"collector": c, "reason": "unexpected"}, 0.0) for c in COLLECTORS],
        "counter",
    )
    out += lines(
        "kvmcpu_build_info", [({"version": "0.1.0", "revision": "test", "python_version": "3.11.2"}, 1.0)]
    )
    return out


class Fleet:
    """Serves each simulated host's /metrics on a port of its own; ``guests`` can change live."""

    def __init__(self) -> None:
        self.host_text, self.host_features = host_part()
        self.guests = {h: list(g) for h, g in FLEET.items()}
        self.started = time.time()
        self.servers: dict[str, ThreadingHTTPServer] = {}

    def body(self, host: str) -> bytes:
        now = time.time()
        parts = [self.host_text.rstrip("\n")]
        for part in (
            qemu_part(),
            guest_part(self.guests[host], self.host_features),
            canary_part(self.started, now),
            self_part(),
        ):
            parts.append("\n".join(part))
        return ("\n".join(parts) + "\n").encode()

    def handler(self, host: str) -> type[BaseHTTPRequestHandler]:
        body: Callable[[], bytes] = lambda: self.body(host)  # noqa: E731

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                data = body()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def start(self) -> list[str]:
        for host in FLEET:
            server = ThreadingHTTPServer(("127.0.0.1", free_port()), self.handler(host))
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self.servers[host] = server
        return [f"127.0.0.1:{s.server_address[1]}" for s in self.servers.values()]

    def stop(self) -> None:
        for server in self.servers.values():
            server.shutdown()
            server.server_close()


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    f = Fleet()
    yield f
    f.stop()


def test_healthy_fleet_fires_nothing(tmp_path: Path, fleet: Fleet) -> None:
    targets = fleet.start()
    assert {Path(p).name for p in RULE_FILES} == {"recording.yml", "alerts.yml", "fleet.yml"}
    prom = PrometheusServer(tmp_path, free_port(), targets).start()
    try:
        wait_until(prom.targets_up, 30, "every simulated host to be scraped")
        # the rules saw the fleet: guests per configuration, each host's level, the recommendation
        n_guests = sum(len(g) for g in FLEET.values())

        def counted() -> list[dict[str, Any]] | None:
            got = prom.query("instance_cpu_config:kvmcpu_guests:count")
            return got if sum(float(c["value"][1]) for c in got) == n_guests else None

        counts = wait_until(counted, 30, f"{n_guests} guests counted per host and configuration")
        assert len(counts) == sum(len({c for _, c in g}) for g in FLEET.values()), (
            "one series per host and configuration"
        )
        levels = wait_until(
            lambda: prom.query("instance:kvmcpu_guest_required_level:x86_64"), 30, "required levels"
        )
        assert {float(v["value"][1]) for v in levels} == {2.0} and len(levels) == len(FLEET)
        wait_until(
            lambda: prom.query("job_cluster:kvmcpu_cpu_model_recommended:rank"),
            30,
            "the fleet recommendation",
        )
        wait_until(
            lambda: prom.query("instance_cpu_config:kvmcpu_guest_config_fleet_migratable:bool == 1"),
            30,
            "migration verdicts",
        )
        # let every rule evaluate many times (1 s intervals); then: no errors, no alert at all
        time.sleep(15)
        assert prom.rule_health() == []
        assert prom.alerts() == [], [(a["labels"], a["state"]) for a in prom.alerts()]

        # control: two guests on Proxmox's old kvm64 default (v1, no AES-NI) appear on hv1: one
        # alert for the host and configuration, with the guest count, and not a second for AES-NI
        fleet.guests["hv1"] += [("104", "pve-kvm64"), ("105", "pve-kvm64")]
        config = CONFIGS["pve-kvm64"][0]

        def level_alerts() -> list[dict[str, Any]]:
            return [a for a in prom.alerts() if a["labels"]["alertname"] == "KvmCpuGuestX86LevelTooLow"]

        (alert,) = wait_until(level_alerts, 30, "KvmCpuGuestX86LevelTooLow for the kvm64 guests")
        assert alert["state"] == "pending"
        assert alert["labels"]["cpu_config"] == config and float(alert["value"]) == 2
        assert "it also hides the host's AES-NI" in alert["annotations"]["description"]
        time.sleep(3)
        assert [a["labels"]["alertname"] for a in prom.alerts()] == ["KvmCpuGuestX86LevelTooLow"]
    finally:
        prom.stop()
