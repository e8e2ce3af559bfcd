"""Kubernetes without a cluster: strict schema validation of every rendered manifest, and the pod contract
run for real.

No API server can run here, so the Job controller itself (podFailurePolicy, backoffLimitPerIndex, pod
replacement) is not exercised; what a pod does is. Each "pod" is one process started with exactly what
the Job gives a pod: the container's command and env from the rendered manifest, JOB_COMPLETION_INDEX,
its own hostname `<job>-<i>` (a UTS namespace, as a pod has) and the headless Service's DNS names
`<job>-<i>.<job>` (here: /etc/hosts lines the test adds and removes), the Secret's keys as environment,
and its own working directory (pods share no disk; checkpoints go to a real S3 API, moto).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from dtrain.config.errors import ConfigError
from dtrain.launch.cli import render
from tests.helpers import TINY, free_port, read_metrics, script_env

K8S_VERSIONS = ("1.31.0", "1.37.0")  # the oldest supported and the newest schemas kubernetes-validate ships


def manifests_of(argv: list[str]) -> list[dict]:
    text, _, _ = render("k8s", argv)
    return [doc for doc in yaml.safe_load_all(text) if doc]


# -- schema and enum checks ------------------------------------------------------------------------------------
ENUMS = {  # field -> allowed values; kubernetes-validate's strict mode checks fields and types, not these
    "completionMode": {"NonIndexed", "Indexed"},
    "podReplacementPolicy": {"TerminatingOrFailed", "Failed"},
    "restartPolicy": {"Always", "OnFailure", "Never"},
    "action": {"FailJob", "FailIndex", "Ignore", "Count"},
    "operator": {"In", "NotIn"},
    "protocol": {"TCP", "UDP", "SCTP"},
    "medium": {"", "Memory"},
    "imagePullPolicy": {"Always", "IfNotPresent", "Never"},
}


def enum_problems(node, path: str = "") -> list[str]:
    problems = []
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else key
            if key in ENUMS and isinstance(value, str) and value not in ENUMS[key]:
                problems.append(f"{where}={value!r} is not one of {sorted(ENUMS[key])}")
            if key == "onPodConditions":
                problems += [f"{where}.status={c.get('status')!r}" for c in value
                             if c.get("status") not in ("True", "False", "Unknown")]
            if key == "onExitCodes" and value.get("operator") == "In" and 0 in value.get("values", []):
                problems.append(f"{where}: exit code 0 cannot be used with operator In")
            problems += enum_problems(value, where)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            problems += enum_problems(item, f"{path}[{i}]")
    return problems


def check_manifests(docs: list[dict]) -> None:
    for doc in docs:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
        assert enum_problems(doc) == [], doc["kind"]
    job = next(d for d in docs if d["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy requires it


S3 = ["checkpoint=s3", "checkpoint.uri=s3://bucket/exp1"]
CASES = {
    "one node": ["--nproc-per-node", "2", "launcher.image=dtrain:1"],
    "two gpu nodes, secret, limits": ["--nodes", "2", "--nproc-per-node", "8", "launcher.image=dtrain:1",
                                      "launcher.gpus_per_node=8", "launcher.cpus_per_node=32", "launcher.memory=200Gi",
                                      "launcher.env_from=s3-creds", "launcher.time_limit=1-00:00:00",
                                      "+launcher.node_selector.pool=spot", "launcher.service_account=trainer",
                                      "trainer.global_batch_size=64", *S3],
}


@pytest.mark.parametrize("case", CASES)
def test_rendered_manifests_validate_strictly(case):
    docs = manifests_of(CASES[case])
    check_manifests(docs)
    job = next(d for d in docs if d["kind"] == "Job")
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert [(r["action"], r.get("onExitCodes", {}).get("values")) for r in rules] == [
        ("Ignore", None), ("Ignore", [75]), ("FailJob", [2]), ("Count", [0, 2, 75])]
    assert job["spec"]["backoffLimitPerIndex"] == 2 and job["spec"]["maxFailedIndexes"] == 0


def test_the_checks_catch_what_they_guard():
    """A wrong field fails strict validation; a wrong enum passes it (why the enum check exists) and is caught."""
    docs = manifests_of(CASES["one node"])
    job = next(d for d in docs if d["kind"] == "Job")
    job["spec"]["template"]["spec"]["containers"][0]["commnd"] = ["x"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, "1.31.0", strict=True)
    del job["spec"]["template"]["spec"]["containers"][0]["commnd"]
    job["spec"]["podFailurePolicy"]["rules"][1]["action"] = "Requeue"
    kubernetes_validate.validate(job, "1.31.0", strict=True)  # strict mode misses it
    assert enum_problems(job) == ["spec.podFailurePolicy.rules[1].action='Requeue' is not one of "
                                  "['Count', 'FailIndex', 'FailJob', 'Ignore']"]


def test_credentials_come_from_the_secret_and_are_never_written():
    docs = manifests_of(CASES["two gpu nodes, secret, limits"])
    container = next(d for d in docs if d["kind"] == "Job")["spec"]["template"]["spec"]["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    with pytest.raises(ConfigError) as refused:
        render("k8s", [*CASES["two gpu nodes, secret, limits"], "+checkpoint.storage_options.secret=hunter2"])
    assert "hunter2" not in str(refused.value) and "carries a credential" in str(refused.value)


# -- the pod contract, for real ---------------------------------------------------------------------------------
HOSTS = Path("/etc/hosts")


@contextmanager
def dns_names(names: list[str], tag: str):
    """What the headless Service publishes, as /etc/hosts lines (removed afterwards)."""
    marker = f"# dtrain-test {tag}"
    try:
        yield lambda: HOSTS.write_text(HOSTS.read_text() + "".join(f"127.0.0.1 {n} {marker}\n" for n in names))
    finally:
        HOSTS.write_text("".join(line for line in HOSTS.read_text().splitlines(keepends=True) if marker not in line))


class Pod:
    """A "pod" process; its output goes to a file so the test can watch it while it runs."""

    def __init__(self, args: list[str], workdir: Path, env: dict[str, str]):
        self.log_path = workdir / "pod.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(args, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            pytest.fail(f"pod did not exit within {timeout:.0f} s:\n{self.log[-3000:]}")


def start_pod(job: dict, index: int, workdir: Path, secret: dict[str, str]) -> Pod:
    """One pod of the Indexed Job: the container's command and env, the Job's index variable, the pod's own
    hostname, the Secret's keys; the container's first process is the one a spot reclaim signals."""
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    name = job["metadata"]["name"]
    env = script_env(JOB_COMPLETION_INDEX=str(index), HOSTNAME=f"{name}-{index}",
                         **{e["name"]: e["value"] for e in container["env"]}, **secret)
    workdir.mkdir(parents=True, exist_ok=True)
    args = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', f"{name}-{index}", *container["command"]]
    return Pod(args, workdir, env)


@pytest.fixture
def pod_namespace_support():
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        if os.environ.get("CI"):
            pytest.fail("CI runs as root with unshare: the Kubernetes pod contract must run")
        pytest.skip("needs root (UTS namespaces for pod hostnames, /etc/hosts for the Service's DNS names)")


def test_pod_contract_spot_reclaim_commits_exits_75_and_relaunch_resumes(pod_namespace_support, s3_server, s3_bucket,
                                                                         tmp_path):
    name = f"dt{uuid.uuid4().hex[:8]}"
    steps = 20
    argv = ["--nodes", "2", "--nproc-per-node", "1", "launcher.image=dtrain:test", f"launcher.job_name={name}",
            "launcher.env_from=s3-creds", f"launcher.rdzv_port={free_port()}", "launcher.rdzv_timeout_s=120",
            "checkpoint=s3", f"checkpoint.uri=s3://{s3_bucket}/{name}", "checkpoint.interval_steps=0",
            f"+checkpoint.storage_options.endpoint_url={s3_server}", *TINY, f"trainer.max_steps={steps}"]
    docs = manifests_of(argv)
    check_manifests(docs)
    job = next(d for d in docs if d["kind"] == "Job")
    grace = job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    secret = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}  # what Secret s3-creds holds
    run_dir = tmp_path / "pod0" / "runs" / f"k8s-{name}"
    with dns_names([f"{name}-0.{name} {name}-0", f"{name}-1.{name} {name}-1"], name) as publish:
        # pod 1 starts first, before the Service has published any name: it must wait, not fail
        pods = [start_pod(job, 1, tmp_path / "pod1", secret)]
        deadline = time.monotonic() + 120
        while f"waiting for rendezvous host '{name}-0.{name}' to resolve" not in pods[0].log:
            assert pods[0].proc.poll() is None and time.monotonic() < deadline, pods[0].log[-3000:]
            time.sleep(0.1)
        time.sleep(1)
        assert pods[0].proc.poll() is None, pods[0].log[-3000:]
        publish()
        pods.insert(0, start_pod(job, 0, tmp_path / "pod0", secret))
        try:
            deadline = time.monotonic() + 180
            while not ((run_dir / "metrics.jsonl").exists()
                       and len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 4):
                assert time.monotonic() < deadline and all(p.proc.poll() is None for p in pods), \
                    [p.log[-2000:] for p in pods]
                time.sleep(0.1)
            reclaimed = time.monotonic()
            pods[1].proc.send_signal(signal.SIGTERM)  # the kubelet, on a spot reclaim of pod 1's node
            codes = [p.wait(grace + 15) for p in pods]
            took = time.monotonic() - reclaimed
        finally:
            for p in pods:
                if p.proc.poll() is None:
                    os.killpg(p.proc.pid, signal.SIGKILL)
        logs = [p.log for p in pods]
        assert codes == [75, 75], [log[-3000:] for log in logs]
        assert took < grace, f"{took:.1f} s to exit after SIGTERM, grace {grace} s"
        assert "forwarding SIGTERM to torchrun" in logs[1]
        assert "preempted by SIGTERM" in logs[1]
        assert "preempted by a peer rank's signal" in logs[0]
        committed = max(row["step"] for row in read_metrics(run_dir))
        # the Job replaces both pods (exit 75 -> Ignore); the new ones resume
        relaunched = [start_pod(job, i, tmp_path / f"pod{i}", secret) for i in (0, 1)]
        codes = [p.wait(240) for p in relaunched]
        logs = [p.log for p in relaunched]
    assert codes == [0, 0], [log[-3000:] for log in logs]
    resumed = logs[0].split("resumed from", 1)[1].splitlines()[0]
    assert f"s3://{s3_bucket}/{name}/step_" in resumed
    assert int(resumed.split("step_", 1)[1][:8]) >= min(committed, 4)
    assert max(row["step"] for row in read_metrics(run_dir)) == steps
