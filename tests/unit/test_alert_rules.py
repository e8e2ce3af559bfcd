"""The alert rules and the dashboard in deploy/monitoring/, checked by the real promtool.

Every alert has unit tests (alerts_test.yml) in which it fires for one run and stays quiet for another
and before its ``for:`` has passed; this file also makes sure no alert is left without such tests."""

from __future__ import annotations

import json
import re
import subprocess

import yaml

from tests.monitoring_tools import MONITORING, tool


def _alerts() -> list[dict]:
    return [rule for group in yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
            for rule in group["rules"] if "alert" in rule]


def test_promtool_accepts_the_rules_and_their_unit_tests_pass():
    promtool = tool("promtool")
    check = subprocess.run([promtool, "check", "rules", "alerts.yml"], cwd=MONITORING, capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0 and "7 rules found" in check.stdout, check.stdout + check.stderr
    config = subprocess.run([promtool, "check", "config", "prometheus.yml"], cwd=MONITORING, capture_output=True,
                            text=True, timeout=60)
    assert config.returncode == 0, config.stdout + config.stderr
    test = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=MONITORING, capture_output=True,
                          text=True, timeout=120)
    assert test.returncode == 0 and "SUCCESS" in test.stdout, test.stdout + test.stderr


def test_every_alert_has_a_firing_and_a_quiet_case():
    cases = [case for test in yaml.safe_load((MONITORING / "alerts_test.yml").read_text())["tests"]
             for case in test["alert_rule_test"]]
    names = {rule["alert"] for rule in _alerts()}
    assert len(names) == 7, names
    for name in names:
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case["exp_alerts"] for case in mine), f"{name} is never expected to fire"
        assert any(not case["exp_alerts"] for case in mine), f"{name} is never expected to stay quiet"
        fired = [alert["exp_labels"]["run"] for case in mine for alert in case["exp_alerts"]]
        assert "good" not in fired, name


def test_dashboard_and_rules_use_only_documented_metrics():
    """Every dtrain_* name in the dashboard and the rules is in README's metric table (which the live test
    checks against what a real run exports)."""
    readme = (MONITORING.parent.parent / "README.md").read_text()
    documented = set(re.findall(r"`(dtrain_[a-z0-9_]+)`", readme))
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    exprs += [rule["expr"] for rule in _alerts()]
    used = {name for expr in exprs for name in re.findall(r"dtrain_[a-z0-9_]+", expr)}
    assert used and used <= documented, sorted(used - documented)
    assert dashboard["templating"]["list"][1]["name"] == "run"
