"""``dtrain launch k8s``: an Indexed Job plus a headless Service, for Kubernetes >= 1.31.

Pod ``i`` of the Job is node ``i``; every pod's hostname is ``<job>-<i>`` under the Service's subdomain,
so pod 0 is reachable as ``<job>-0.<job>`` and hosts the rendezvous. The Service publishes pods that
are not ready yet (``publishNotReadyAddresses``): a training pod is never "ready", and the other pods
must find pod 0 while it starts. The names may still take a moment to appear in DNS, which is why
``dtrain launch run`` waits for them.

The exit-code contract becomes the Job's ``podFailurePolicy``: 75 (preempted after a commit) and
disruptions (spot reclaim, eviction, node drain: condition ``DisruptionTarget``) are ignored, so the
index gets a new pod that resumes; 2 (bad config) fails the whole Job; anything else counts against
``backoffLimitPerIndex`` (``launcher.max_crash_retries``), and ``maxFailedIndexes: 0`` ends the Job as
soon as one index has used up its retries (the other pods could never rendezvous again).
"""

from __future__ import annotations

import shutil
import subprocess

import yaml

from dtrain import exit_codes
from dtrain.config.errors import ConfigError
from dtrain.launch.spec import Launch, time_limit_seconds
from dtrain.launch.torchrun import node_command

CONTAINER = "trainer"
MIN_VERSION = "1.31"


def _labels(launch: Launch) -> dict[str, str]:
    return {"app.kubernetes.io/name": "dtrain", "app.kubernetes.io/instance": launch.launcher.job_name}


def service(launch: Launch) -> dict:
    lc = launch.launcher
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": lc.job_name, "namespace": lc.namespace, "labels": _labels(launch)},
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                 "selector": {"batch.kubernetes.io/job-name": lc.job_name},
                 "ports": [{"name": "rendezvous", "port": lc.rdzv_port, "protocol": "TCP"}]},
    }


def pod_failure_policy() -> dict:
    """The exit-code contract as Job rules (evaluated in order; the first match wins)."""
    def codes(operator: str, values: list[int]) -> dict:
        return {"containerName": CONTAINER, "operator": operator, "values": values}

    return {"rules": [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "Ignore", "onExitCodes": codes("In", [exit_codes.PREEMPTED])},
        {"action": "FailJob", "onExitCodes": codes("In", [exit_codes.CONFIG_ERROR])},
        {"action": "Count", "onExitCodes": codes("NotIn", [exit_codes.OK, exit_codes.CONFIG_ERROR,
                                                           exit_codes.PREEMPTED])},
    ]}


def container(launch: Launch) -> dict:
    lc = launch.launcher
    endpoint = f"{lc.job_name}-0.{lc.job_name}:{lc.rdzv_port}"
    env = [{"name": "DTRAIN_K8S_JOB_NAME", "value": lc.job_name}]  # run.name=k8s-<job>, the same in every pod
    env += [{"name": key, "value": str(value)} for key, value in lc.env.items()]
    spec: dict = {
        "name": CONTAINER, "image": lc.image,
        "command": node_command(launch, endpoint=endpoint, rdzv_id=lc.job_name),
        "env": env,
        "ports": [{"name": "rendezvous", "containerPort": lc.rdzv_port, "protocol": "TCP"}],
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if lc.env_from:
        # credentials stay in the Secret: the manifest names it and never holds a value
        spec["envFrom"] = [{"secretRef": {"name": lc.env_from}}]
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if lc.cpus_per_node:
        requests["cpu"] = str(lc.cpus_per_node)
    if lc.memory:
        requests["memory"] = limits["memory"] = str(lc.memory)
    if lc.gpus_per_node:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(lc.gpus_per_node)
    if requests or limits:
        spec["resources"] = {k: v for k, v in (("requests", requests), ("limits", limits)) if v}
    return spec


def job(launch: Launch) -> dict:
    lc = launch.launcher
    pod: dict = {
        "subdomain": lc.job_name,
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": launch.grace_s,
        "containers": [container(launch)],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": lc.shm_size}}],
    }
    if lc.service_account:
        pod["serviceAccountName"] = lc.service_account
    if lc.node_selector:
        pod["nodeSelector"] = dict(lc.node_selector)
    spec: dict = {
        "completionMode": "Indexed",
        "completions": lc.nodes,
        "parallelism": lc.nodes,
        "backoffLimitPerIndex": lc.max_crash_retries,
        "maxFailedIndexes": 0,
        # a new pod for an index only once the old one is gone: two pods must never share a hostname
        "podReplacementPolicy": "Failed",
        "podFailurePolicy": pod_failure_policy(),
        "template": {"metadata": {"labels": _labels(launch)}, "spec": pod},
    }
    if lc.time_limit:
        spec["activeDeadlineSeconds"] = time_limit_seconds(str(lc.time_limit))
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": lc.job_name, "namespace": lc.namespace, "labels": _labels(launch)},
            "spec": spec}


def manifests(launch: Launch) -> list[dict]:
    return [service(launch), job(launch)]


def render(launch: Launch) -> str:
    lc = launch.launcher
    header = [
        f"# Rendered by: {launch.command}",
        "# Regenerate it with that command instead of editing; apply with `kubectl apply -f THIS_FILE`.",
        f"# Kubernetes >= {MIN_VERSION}: an Indexed Job of {lc.nodes} pod(s) x {lc.nproc_per_node} process(es) and the "
        "headless Service that names them.",
        "# Exit-code contract (dtrain/exit_codes.py), enforced by the Job's podFailurePolicy:",
        *(f"#   {code:<5} {what}: {action}" for code, what, action in exit_codes.CONTRACT),
        f"# terminationGracePeriodSeconds {launch.grace_s}: {launch.grace.explanation}.",
        "# Spot nodes may give less than that (GKE: 15 s for non-system pods at a spot reclaim; see README).",
    ]
    if lc.env_from:
        header.append(f"# Storage credentials come from Secret '{lc.env_from}' (create it yourself; never inline "
                      "keys here).")
    body = "---\n".join(yaml.safe_dump(m, sort_keys=False, width=1000) for m in manifests(launch))
    return "\n".join(header) + "\n" + body


def submit(text: str) -> int:
    """``kubectl apply -f -``. Not exercised by dtrain's tests (no API server runs there)."""
    if shutil.which("kubectl") is None:
        raise ConfigError("kubectl is not on PATH; write the manifests with --out and apply them yourself")
    result = subprocess.run(["kubectl", "apply", "-f", "-"], input=text, text=True)
    return result.returncode
