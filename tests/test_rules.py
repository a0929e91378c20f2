"""The shipped Prometheus rules and example config, checked and unit-tested with the real promtool.

promtool's unit tests (deploy/prometheus/tests/*.yml) hold the firing and silent cases of every
alert; this module runs them and checks that none is missing, so the README's test command covers
the rules like the code.
"""

from __future__ import annotations

import re

import pytest
from support.prometheus import (
    EXAMPLE_CONFIG,
    RULE_FILES,
    RULE_TESTS_DIR,
    RUNBOOK,
    alert_rules,
    markdown_anchors,
    promtool,
    recording_rules,
    rule_test_coverage,
)

RULE_TESTS = sorted(RULE_TESTS_DIR.glob("*.yml"))


def test_promtool_check_rules() -> None:
    res = promtool("check", "rules", *map(str, RULE_FILES))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_promtool_check_config_of_the_example() -> None:
    res = promtool("check", "config", str(EXAMPLE_CONFIG))
    assert res.returncode == 0, res.stdout + res.stderr
    # the example loads every rule file, so a user copying it gets the recording rules alerts need
    assert f"{len(RULE_FILES)} rule files found" in res.stdout


@pytest.mark.parametrize("test_file", RULE_TESTS, ids=lambda p: p.name)
def test_promtool_test_rules(test_file) -> None:
    res = promtool("test", "rules", test_file.name, cwd=RULE_TESTS_DIR)
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_alert_has_firing_and_silent_unit_tests() -> None:
    names = {r["alert"] for r in alert_rules()}
    firing, silent = rule_test_coverage(RULE_TESTS)
    assert names - firing == set(), "alerts without a firing test"
    assert names - silent == set(), "alerts without a silent test"
    assert (firing | silent) - names == set(), "tests for alerts that do not exist"


def test_every_alert_is_documented_and_actionable() -> None:
    anchors = markdown_anchors(RUNBOOK)
    problems = []
    for rule in alert_rules():
        name = rule["alert"]
        ann = rule.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            if not ann.get(key):
                problems.append(f"{name}: no {key}")
        url = ann.get("runbook_url", "")
        if not url.endswith(f"docs/runbook.md#{name.lower()}"):
            problems.append(f"{name}: runbook_url {url!r} does not point at its own runbook section")
        if name.lower() not in anchors:
            problems.append(f"{name}: no '## {name}' section in {RUNBOOK.name}")
        if rule.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
            problems.append(f"{name}: severity label missing or unknown")
    assert problems == []


def test_every_recording_rule_is_used_or_named_by_convention() -> None:
    # level:metric:operations, so users can tell recorded series from raw ones at a glance
    for rule in recording_rules():
        assert re.fullmatch(r"[a-z_]+:kvmcpu_[a-z0-9_]+:[a-z0-9_]+", rule["record"]), rule["record"]


def test_no_rule_hard_codes_a_job() -> None:
    # sites name their scrape job as they like; the example's job name must not be load-bearing
    for rule in alert_rules() + recording_rules():
        assert "job=" not in rule["expr"].replace(" ", ""), rule.get("alert") or rule.get("record")


def test_only_what_pages_is_critical() -> None:
    # issue 20: critical only for AES-NI lost on a host, a canary proving AES-NI unused, the
    # exporter down; everything else is a ticket (warning); inventory facts are no alerts
    critical = {r["alert"] for r in alert_rules() if r["labels"]["severity"] == "critical"}
    assert critical == {"KvmCpuHostAesNiFlagLost", "KvmCpuCanaryAesNiNotUsed", "KvmCpuExporterDown"}
    assert {r["labels"]["severity"] for r in alert_rules()} == {"critical", "warning"}


def test_guest_alerts_fire_per_configuration_not_per_guest() -> None:
    # the label sets of guest alerts come from per-configuration series: no alert reads the
    # per-guest series except through a count per host (one alert per host and configuration)
    for rule in alert_rules():
        if rule["alert"].startswith("KvmCpuGuest"):
            assert "kvmcpu_guest_info" not in rule["expr"], rule["alert"]
            assert "guest=" not in rule["annotations"]["summary"], rule["alert"]
