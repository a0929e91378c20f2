"""Helpers for the monitoring tests: promtool, a real Prometheus server, rule and runbook parsing.

The Prometheus server is Debian's ``/usr/bin/prometheus``, started on a free loopback port with its
TSDB in a temporary directory, scraping and evaluating every second so that a test sees alerts go
pending within seconds. Its config is derived from the shipped example
(``deploy/prometheus/prometheus.yml``) so the example itself is exercised.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import yaml

ROOT = Path(__file__).resolve().parent.parent.parent
DEPLOY = ROOT / "deploy" / "prometheus"
RULES_DIR = DEPLOY / "rules"
RULE_FILES = (RULES_DIR / "recording.yml", RULES_DIR / "alerts.yml", RULES_DIR / "fleet.yml")
RULE_TESTS_DIR = DEPLOY / "tests"
EXAMPLE_CONFIG = DEPLOY / "prometheus.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"
JOB = "kvm-cpu-exporter"

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"

T = TypeVar("T")


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run promtool; the caller asserts on returncode so a failure shows promtool's own message."""
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule of the shipped rule files, as parsed YAML."""
    return [
        r
        for path in RULE_FILES
        for g in yaml.safe_load(path.read_text())["groups"]
        for r in g["rules"]
        if "alert" in r
    ]


def recording_rules() -> list[dict[str, Any]]:
    return [
        r
        for path in RULE_FILES
        for g in yaml.safe_load(path.read_text())["groups"]
        for r in g["rules"]
        if "record" in r
    ]


def github_anchor(heading: str) -> str:
    """The anchor GitHub (and most Markdown renderers) give a heading."""
    slug = heading.strip().lower()
    slug = re.sub(r"[^\w\- ]", "", slug)
    return slug.replace(" ", "-")


def markdown_anchors(path: Path) -> set[str]:
    return {
        github_anchor(m.group(1))
        for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", path.read_text(), flags=re.MULTILINE)
    }


def rule_test_coverage(paths: Iterable[Path]) -> tuple[set[str], set[str]]:
    """(alerts with a test expecting them to fire, alerts with a test expecting silence)."""
    firing: set[str] = set()
    silent: set[str] = set()
    for path in paths:
        for test in yaml.safe_load(path.read_text()).get("tests", []):
            for case in test.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else silent).add(case["alertname"])
    return firing, silent


def wait_until(predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 1.0) -> T:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` and the last value."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")


def settle_rules(url: str, rounds: int = 3, timeout: float = 60) -> None:
    """Wait until every rule group of the Prometheus at ``url`` has evaluated ``rounds`` more times."""

    def last_evaluations() -> dict[str, str]:
        with urllib.request.urlopen(url + "/api/v1/rules", timeout=5) as resp:
            groups = json.load(resp)["data"]["groups"]
        return {f"{g['file']}:{g['name']}": g.get("lastEvaluation", "") for g in groups}

    seen = {name: {stamp} for name, stamp in last_evaluations().items()}

    def settled() -> bool:
        for name, stamp in last_evaluations().items():
            seen.setdefault(name, set()).add(stamp)
        return all(len(stamps) > rounds for stamps in seen.values())

    wait_until(settled, timeout, f"every rule group to evaluate {rounds} more times", interval=0.25)


class PrometheusServer:
    """A real Prometheus scraping ``targets`` every second with the shipped rule files."""

    def __init__(
        self,
        workdir: Path,
        port: int,
        targets: list[str],
        rule_files: Iterable[Path] = RULE_FILES,
    ) -> None:
        self.workdir = workdir
        self.port = port
        self.targets = targets
        self.rule_files = [Path(p).resolve() for p in rule_files]
        self.config_path = workdir / "prometheus.yml"
        self.log_path = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self) -> None:
        """The shipped example with 1 s intervals, loopback targets and absolute rule paths."""
        cfg = yaml.safe_load(EXAMPLE_CONFIG.read_text())
        cfg["global"]["scrape_interval"] = "1s"
        cfg["global"]["evaluation_interval"] = "1s"
        cfg["rule_files"] = [str(p) for p in self.rule_files]
        (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == JOB]
        job["scrape_interval"] = "1s"
        job["scrape_timeout"] = "1s"
        job["static_configs"] = [{"targets": self.targets}]
        self.config_path.write_text(yaml.safe_dump(cfg))

    def start(self) -> PrometheusServer:
        self.write_config()
        check = promtool("check", "config", str(self.config_path))
        assert check.returncode == 0, check.stdout + check.stderr
        logf = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_until(self._ready, 30, "Prometheus /-/ready", interval=0.3)
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited {self.proc.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def settle(self, rounds: int = 3, timeout: float = 60) -> None:
        """Wait until every rule group has evaluated ``rounds`` more times. Some rules read what a
        rule of another group recorded (fleet.yml reads recording.yml's guest and host counts, read
        once per cycle), so an answer is final only a few evaluations after its inputs first appear."""
        settle_rules(self.url, rounds, timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def api(self, path: str, **params: str) -> Any:
        """GET an /api/v1 endpoint; returns ``data``. A query error raises with Prometheus' message."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=15) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as err:
            body = json.loads(err.read() or b"{}")
            raise PrometheusQueryError(params.get("query", path), body.get("error", str(err))) from err
        if body.get("status") != "success":
            raise PrometheusQueryError(params.get("query", path), body.get("error", "unknown error"))
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query; returns the result list (vector) or a one-element list (scalar)."""
        data = self.api("query", query=promql)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def alerts(self) -> list[dict[str, Any]]:
        return list(self.api("alerts")["alerts"])

    def alert_states(self, name: str) -> list[tuple[dict[str, str], str]]:
        return [(a["labels"], a["state"]) for a in self.alerts() if a["labels"].get("alertname") == name]

    def targets_up(self) -> bool:
        active = self.api("targets")["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)

    def rule_health(self) -> list[tuple[str, str, str]]:
        """(rule name, health, last error) of every rule that is not healthy."""
        bad = []
        for group in self.api("rules")["groups"]:
            for rule in group["rules"]:
                if rule.get("health") not in ("ok", "unknown"):
                    bad.append((rule["name"], rule.get("health", ""), rule.get("lastError", "")))
        return bad


class PrometheusQueryError(AssertionError):
    def __init__(self, query: str, message: str) -> None:
        super().__init__(f"{query}: {message}")
        self.query = query
        self.message = message


# --------------------------------------------------------------------------- dashboards

GRAFANA = ROOT / "grafana"
DASHBOARD_DIR = GRAFANA / "dashboards"
#: what the e2e test substitutes for Grafana's built-in interval variables
BUILTINS = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "15s"}


def load_generator() -> Any:
    """grafana/generate.py as a module (grafana/ is not a package: it ships as plain files)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("grafana_generate", GRAFANA / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def committed_dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARD_DIR.glob("*.json"))}


def dashboard_variables(dashboard: dict[str, Any]) -> dict[str, str]:
    """Template variable name -> its label_values() definition (query variables only)."""
    return {v["name"]: v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"}


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL as written) for every target of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace Grafana variables the way Grafana would for the given (regex) values."""
    for name, value in BUILTINS.items():
        expr = expr.replace(name, value)
    for name, value in sorted(values.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    return expr


def label_values_as_promql(definition: str) -> tuple[str, str]:
    """``label_values(selector, label)`` -> (an equivalent PromQL query, the label)."""
    m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", definition.strip())
    assert m, f"not a label_values() query: {definition}"
    return f"group by ({m.group(2)}) ({m.group(1)})", m.group(2)
