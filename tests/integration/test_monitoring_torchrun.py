"""The monitor in real torchrun jobs: a real Prometheus server scrapes a live 2-rank run and answers every
dashboard query; a rank slowed by 30% is named at 4 ranks."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from tests.helpers import REPO, TINY, free_port, kill_tree, read_metrics, start, torchrun, torchrun_args
from tests.monitoring_tools import MONITORING, tool

# panels whose metric another piece of work adds (exposed communication: the scaling work; goodput: the
# goodput ledger); they must not be exported yet: once one is, this list must shrink
PENDING: set[str] = set()  # metrics a dashboard panel shows before dtrain exports them (none now)


def _query(base: str, expr: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    answer = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


@pytest.fixture
def prometheus(tmp_path):
    """A real Prometheus on 127.0.0.1 with dtrain's alert rules, its own TSDB folder, stopped after the test."""
    binary = tool("prometheus")
    target, port = free_port(), free_port()
    (tmp_path / "alerts.yml").write_text((MONITORING / "alerts.yml").read_text())
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\nrule_files: [alerts.yml]\n"
        f"scrape_configs:\n  - job_name: dtrain\n    static_configs: [{{targets: ['127.0.0.1:{target}']}}]\n")
    proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{base}/-/ready", timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("prometheus did not become ready")
            time.sleep(0.2)
    yield base, target
    proc.kill()
    proc.wait()


def test_prometheus_scrapes_a_live_run_and_every_dashboard_panel_has_data(prometheus, tmp_path):
    base, target = prometheus
    # quiet logs: nothing reads the pipes until the end, and a full pipe would stall the run
    run = start(torchrun_args(2, [
        *TINY, "trainer.max_steps=100000", "trainer.log_every=25", "trainer.eval_every=25", "trainer.eval_batches=1",
        "checkpoint.interval_steps=25", "monitor.straggler_window=5", "hardware.peak_flops_per_device=1e11",
        f"logging.prometheus.port={target}", "logging.progress=off", "logging.level=WARNING", "run.name=live",
        f"run.dir={tmp_path / 'run'}"]))
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    targets = [(panel["title"], t["expr"].replace("$run", ".*")) for panel in dashboard["panels"]
               for t in panel["targets"]]
    try:
        missing: list = targets
        deadline = time.monotonic() + 180
        while missing and time.monotonic() < deadline:
            if run.poll() is not None:
                pytest.fail(f"the run ended early (rc={run.returncode}):\n{run.communicate()[1][-3000:]}")
            time.sleep(2)
            missing = [(title, expr) for title, expr in targets
                       if not set(re.findall(r"dtrain_[a-z0-9_]+", expr)) & PENDING and not _query(base, expr)]
        assert not missing, f"panels without data after 180 s: {missing}"
        for title, expr in targets:  # the pending ones are not there yet (and so need no data)
            if set(re.findall(r"dtrain_[a-z0-9_]+", expr)) & PENDING:
                assert not _query(base, expr), f"{title!r} has data now: take its metric out of PENDING ({expr})"
        exported = {row["metric"]["__name__"] for row in _query(base, '{__name__=~"dtrain_.*"}')}
        rules = json.loads(urllib.request.urlopen(f"{base}/api/v1/rules", timeout=10).read())["data"]["groups"]
        firing = _query(base, 'ALERTS{alertstate="firing"}')
    finally:
        kill_tree(run.pid)
        run.communicate()
    # every exported name is documented in README's table, with the job labels the rules aggregate by
    readme = (REPO / "README.md").read_text()
    assert exported <= set(re.findall(r"`(dtrain_[a-z0-9_]+)`", readme)), sorted(exported)
    assert {"dtrain_step", "dtrain_loss", "dtrain_straggler_score", "dtrain_checkpoint_step"} <= exported
    assert all(rule["health"] == "ok" for group in rules for rule in group["rules"]), rules
    assert sum(len(group["rules"]) for group in rules) == 7
    assert firing == [], firing  # a healthy run trips no alert


def test_a_rank_slowed_by_30_percent_is_named_within_50_steps_at_4_ranks(tmp_path):
    """The other three ranks form an even set under the same oversubscription: none of them is ever named."""
    result = torchrun(4, [*TINY, "trainer.max_steps=50", "trainer.log_every=10", "checkpoint.interval_steps=0",
                          "checkpoint.save_final=false", "monitor.straggler_window=12", f"run.dir={tmp_path}"],
                      timeout=300, DTRAIN_FAULT="slow@2:0.3")
    assert result.returncode == 0, result.stderr[-3000:]
    windows = [row for row in read_metrics(tmp_path) if "stragglers" in row]
    assert [row["step"] for row in windows] == [12, 24, 36, 48]  # ranks are named from the third window on
    # named within 50 steps: in the window of step 36 or 48 (a 30% slower rank scores 0.77 against the 0.8
    # threshold, so one window of a loaded CI machine can miss it; the requirement is "within 50 steps")
    assert any(row["stragglers"] == [2] for row in windows[2:]), windows
    assert all(set(row["stragglers"]) <= {2} for row in windows), windows  # nobody else, ever
    assert "straggler: rank 2 score" in result.stderr
