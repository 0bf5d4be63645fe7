"""The manifests' safety (issue 12): privilege in the node agent alone, locked-down pods, alerts.

Checked on what kustomize renders, as a cluster would get it: which Pod Security level each pod
meets (the profile's checks, below), what the NetworkPolicy lets in (its rules evaluated for a
few peers), how the sidecar reaches the node agent, and the alert rules with promtool itself.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from agent.bench.processes import ProcessGroup, child_env, start_twin
from agent.catalog import gpu_spec, model_spec
from agent.cli import build_parser
from agent.config import Settings, env_name
from agent.node.settings import NodeSettings, load_node_settings, node_env
from agent.sidecar.watchdog import ActuatorMode, LoopMode
from agent.twin.setup import TwinSetup
from tests.unit.test_deploy import (
    BASE,
    COORDINATOR,
    DEPLOY,
    ENGINES,
    EXTERNAL_METRICS,
    K8S_SCHEMA_VERSION,
    OVERLAYS,
    SIDECAR,
    container,
    exported_metric_names,
    kustomize,
    metric_names,
    sidecar_settings,
    yaml_documents,
    yaml_file,
)

NODE_AGENT = DEPLOY / "k8s" / "node-agent"
PROMETHEUS_OPERATOR = OVERLAYS / "prometheus-operator"
MONITORING = PROMETHEUS_OPERATOR / "monitoring"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yaml"
ENGINE_NAMESPACE, AGENT_NAMESPACE = "throttllem", "throttllem-system"
# Series the alerts read from others: kube-state-metrics' DaemonSet status and Prometheus' own `up`.
ALERT_EXTERNAL_METRICS = EXTERNAL_METRICS | {"up", "kube_daemonset_status_number_unavailable"}
# Every pod the engine namespace receives, built the ways a user applies them.
ENGINE_BUILDS = (BASE, ENGINES, OVERLAYS / "otel", PROMETHEUS_OPERATOR)
SOCKET_VOLUME = "hostPath volume node-agent (/run/throttllem)"  # the engine pods' one exception

needs_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed"
)
needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (Debian: apt-get install prometheus; .ci/run installs it)",
)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No THROTTLLEM_* variable from the caller's environment."""
    for field in Settings.model_fields:
        monkeypatch.delenv(env_name(field), raising=False)
    for field in NodeSettings.model_fields:
        monkeypatch.delenv(node_env(field), raising=False)
    monkeypatch.chdir(DEPLOY.parent)
    yield


def of_kind(docs: Sequence[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def pod_specs(docs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each workload's pod template spec, by workload name."""
    return {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]
        for d in docs
        if d["kind"] in ("Deployment", "DaemonSet")
    }


def plain_env(spec: Mapping[str, Any]) -> dict[str, str]:
    """A container's literal `env` values."""
    return {e["name"]: e["value"] for e in spec.get("env", []) if "value" in e}


def config_map_env(docs: Sequence[dict[str, Any]], pod: Mapping[str, Any]) -> dict[str, str]:
    """The sidecar's THROTTLLEM_* settings: the data of the ConfigMap it takes its env from."""
    (ref,) = container(pod, SIDECAR)["envFrom"]
    (config_map,) = [
        d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"] == ref["configMapRef"]["name"]
    ]
    return dict(config_map["data"])


# --- Pod Security Admission ---------------------------------------------------------------------

# The Pod Security Standards' checks (Kubernetes v1.30) a pod spec of ours could fail.
BASELINE_CAPABILITIES = frozenset(
    {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE"}
    | {"SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
)
RESTRICTED_VOLUMES = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)


def pod_security_violations(pod: Mapping[str, Any]) -> dict[str, list[str]]:
    """What keeps a pod spec from each Pod Security level: {"baseline": [...], "restricted": [...]}."""
    baseline: list[str] = [key for key in ("hostNetwork", "hostPID", "hostIPC") if pod.get(key)]
    restricted: list[str] = []
    pod_context = pod.get("securityContext", {})
    for volume in pod.get("volumes", []):
        (kind,) = [key for key in volume if key != "name"]
        if kind == "hostPath":
            baseline.append(f"hostPath volume {volume['name']} ({volume['hostPath']['path']})")
        elif kind not in RESTRICTED_VOLUMES:
            restricted.append(f"{kind} volume {volume['name']}")
    if pod_context.get("runAsUser") == 0:
        restricted.append("pod runs as uid 0")
    for spec in [*pod.get("initContainers", []), *pod["containers"]]:
        name, context = spec["name"], spec.get("securityContext", {})
        capabilities = context.get("capabilities", {})
        added = set(capabilities.get("add", []))
        seccomp = context.get("seccompProfile", pod_context.get("seccompProfile", {})).get("type")
        if context.get("privileged"):
            baseline.append(f"{name}: privileged")
        if added - BASELINE_CAPABILITIES:
            baseline.append(f"{name}: adds {', '.join(sorted(added - BASELINE_CAPABILITIES))}")
        if any(port.get("hostPort") for port in spec.get("ports", [])):
            baseline.append(f"{name}: hostPort")
        if context.get("procMount", "Default") != "Default":
            baseline.append(f"{name}: procMount")
        if seccomp == "Unconfined":
            baseline.append(f"{name}: seccomp Unconfined")
        if context.get("allowPrivilegeEscalation") is not False:
            restricted.append(f"{name}: allowPrivilegeEscalation not false")
        if "ALL" not in capabilities.get("drop", []):
            restricted.append(f"{name}: does not drop ALL capabilities")
        if added - {"NET_BIND_SERVICE"}:
            restricted.append(f"{name}: adds capabilities")
        if context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is not True:
            restricted.append(f"{name}: runAsNonRoot not true")
        if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
            restricted.append(f"{name}: runs as uid 0")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            restricted.append(f"{name}: no RuntimeDefault or Localhost seccomp profile")
    return {"baseline": baseline, "restricted": baseline + restricted}


def strictest_level(pods: Sequence[Mapping[str, Any]]) -> str:
    """The strictest Pod Security level every pod meets."""
    for level in ("restricted", "baseline"):
        if all(not pod_security_violations(pod)[level] for pod in pods):
            return level
    return "privileged"


def test_pod_security_check_catches_each_rule() -> None:
    good = {
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [
            {
                "name": "c",
                "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
            }
        ],
        "volumes": [{"name": "t", "emptyDir": {}}],
    }
    assert pod_security_violations(good) == {"baseline": [], "restricted": []}

    def spoilt(pod_changes: Mapping[str, Any] = {}, **context: Any) -> dict[str, list[str]]:
        pod = yaml.safe_load(yaml.safe_dump(good))
        pod.update(pod_changes)
        pod["containers"][0]["securityContext"].update(context)
        return pod_security_violations(pod)

    assert spoilt({"hostPID": True})["baseline"] == ["hostPID"]
    assert spoilt({"volumes": [{"name": "h", "hostPath": {"path": "/x"}}]})["baseline"] == [
        "hostPath volume h (/x)"
    ]
    assert spoilt(capabilities={"drop": ["ALL"], "add": ["SYS_ADMIN"]})["baseline"] == ["c: adds SYS_ADMIN"]
    assert spoilt(privileged=True)["baseline"] == ["c: privileged"]
    assert spoilt(allowPrivilegeEscalation=True) == {
        "baseline": [],
        "restricted": ["c: allowPrivilegeEscalation not false"],
    }
    assert spoilt(runAsNonRoot=False)["restricted"] == ["c: runAsNonRoot not true"]
    assert spoilt({"volumes": [{"name": "n", "nfs": {}}]})["restricted"] == ["nfs volume n"]
    assert spoilt({"securityContext": {"runAsNonRoot": True}})["restricted"] == [
        "c: no RuntimeDefault or Localhost seccomp profile"
    ]
    assert strictest_level([good]) == "restricted"


@needs_kubectl
@pytest.mark.parametrize("build", ENGINE_BUILDS, ids=lambda path: str(path.relative_to(DEPLOY)))
def test_engine_pods_meet_restricted_but_for_the_node_agent_socket(build: Path) -> None:
    pods = pod_specs(kustomize(build))
    assert pods
    for name, pod in pods.items():
        assert pod_security_violations(pod)["restricted"] == [SOCKET_VOLUME], name
        (socket_volume,) = [v for v in pod["volumes"] if "hostPath" in v]
        mounts = [
            m
            for c in pod["containers"]
            for m in c.get("volumeMounts", [])
            if m["name"] == socket_volume["name"]
        ]
        assert [(m["mountPath"], m.get("readOnly")) for m in mounts] == [("/run/throttllem", True)], name


@needs_kubectl
def test_dry_run_and_coordinator_pods_meet_restricted_in_full() -> None:
    for build in (OVERLAYS / "dryrun", COORDINATOR):
        pods = pod_specs(kustomize(build))
        assert pods and strictest_level(list(pods.values())) == "restricted", build


def pod_security_labels(namespace: Mapping[str, Any]) -> dict[str, str]:
    prefix = "pod-security.kubernetes.io/"
    return {
        k.removeprefix(prefix): v for k, v in namespace["metadata"]["labels"].items() if k.startswith(prefix)
    }


@needs_kubectl
def test_namespaces_enforce_what_their_pods_need_and_warn_of_the_rest() -> None:
    engine_docs = [doc for build in (*ENGINE_BUILDS, COORDINATOR) for doc in kustomize(build)]
    (engine_namespace,) = {yaml.safe_dump(ns): ns for ns in of_kind(engine_docs, "Namespace")}.values()
    assert engine_namespace["metadata"]["name"] == ENGINE_NAMESPACE
    assert {d["metadata"]["namespace"] for d in engine_docs if d["kind"] != "Namespace"} == {ENGINE_NAMESPACE}
    labels = pod_security_labels(engine_namespace)
    # Enforced: the strictest level every pod there meets (the socket's hostPath rules out baseline);
    # warned and audited: restricted, which they meet but for that one volume.
    assert labels["enforce"] == strictest_level(list(pod_specs(engine_docs).values())) == "privileged"
    assert labels["warn"] == labels["audit"] == "restricted"
    assert labels["enforce-version"] == labels["warn-version"] == labels["audit-version"] == "v1.30"

    agent_docs = kustomize(NODE_AGENT)
    (agent_namespace,) = of_kind(agent_docs, "Namespace")
    assert agent_namespace["metadata"]["name"] == AGENT_NAMESPACE
    assert {d["metadata"]["namespace"] for d in agent_docs if d["kind"] != "Namespace"} == {AGENT_NAMESPACE}
    assert pod_security_labels(agent_namespace)["enforce"] == "privileged"
    (agent_pod,) = pod_specs(agent_docs).values()
    assert sorted(pod_security_violations(agent_pod)["baseline"]) == [
        "hostPID",
        "hostPath volume pod-logs (/var/log/pods)",
        "hostPath volume pod-resources (/var/lib/kubelet/pod-resources)",
        "hostPath volume socket-dir (/run/throttllem)",
        "node-agent: adds SYS_ADMIN",
    ]


@needs_kubectl
def test_only_the_coordinator_mounts_a_service_account_token() -> None:
    builds = (*ENGINE_BUILDS, OVERLAYS / "dryrun", COORDINATOR, NODE_AGENT)
    pods = {name: pod for build in builds for name, pod in pod_specs(kustomize(build)).items()}
    assert {name: pod.get("automountServiceAccountToken") for name, pod in pods.items()} == {
        **{name: False for name in pods if name != "throttllem-coordinator"},
        "throttllem-coordinator": True,  # it calls the API server (rbac.yaml)
    }
    (account,) = of_kind(kustomize(NODE_AGENT), "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    assert pods["throttllem-node"]["serviceAccountName"] == account["metadata"]["name"]
    coordinator = container(pods["throttllem-coordinator"], "coordinator")["securityContext"]
    assert coordinator["allowPrivilegeEscalation"] is False and coordinator["readOnlyRootFilesystem"] is True


@needs_kubectl
def test_triton_runs_unprivileged_on_a_read_only_root_with_writable_tmp_and_shm() -> None:
    for build in (BASE, ENGINES):
        for name, pod in pod_specs(kustomize(build)).items():
            triton = container(pod, "triton")
            context = triton["securityContext"]
            assert (
                context["capabilities"] == {"drop": ["ALL"]} and context["allowPrivilegeEscalation"] is False
            )
            assert context["runAsUser"] != 0 and context["readOnlyRootFilesystem"] is True
            volumes = {v["name"]: v for v in pod["volumes"]}
            mounts = {m["mountPath"]: volumes[m["name"]] for m in triton["volumeMounts"]}
            assert "emptyDir" in mounts["/tmp"] and mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory", name
            assert plain_env(triton)["HOME"] == "/tmp"  # caches land on the writable volume


# --- the sidecar and the node agent -------------------------------------------------------------


@needs_kubectl
def test_sidecar_reaches_the_node_agent_socket_as_its_pod(
    clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = kustomize(BASE)
    (pod,) = pod_specs(docs).values()
    sidecar = container(pod, SIDECAR)
    (agent_pod,) = pod_specs(kustomize(NODE_AGENT)).values()
    agent = container(agent_pod, "node-agent")
    agent_env = plain_env(agent)
    # One socket path on both sides, in the host directory both mount.
    socket_path = Path(agent_env["THROTTLLEM_NODE_SOCKET"])
    env = config_map_env(docs, pod)
    assert Path(env["THROTTLLEM_NODE_SOCKET"]) == socket_path
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = [m for m in sidecar["volumeMounts"] if "hostPath" in volumes[m["name"]]]
    assert volumes[mount["name"]]["hostPath"] == {"path": str(socket_path.parent), "type": "Directory"}
    assert Path(mount["mountPath"]) == socket_path.parent
    agent_volumes = {v["name"]: v for v in agent_pod["volumes"]}
    (agent_mount,) = [m for m in agent["volumeMounts"] if Path(m["mountPath"]) == socket_path.parent]
    assert agent_volumes[agent_mount["name"]]["hostPath"] == {
        "path": str(socket_path.parent),
        "type": "DirectoryOrCreate",
    }
    # The socket is mode 0660 in THROTTLLEM_NODE_SOCKET_GID: the sidecar runs in that group, and the
    # agent is a member, which its chown needs without CAP_CHOWN.
    gid = int(agent_env["THROTTLLEM_NODE_SOCKET_GID"])
    assert sidecar["securityContext"]["runAsGroup"] == gid
    assert gid in agent_pod["securityContext"]["supplementalGroups"]
    # Who the sidecar is, from the Downward API: the agent leases it its own pod's GPUs only.
    downward = {
        e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in sidecar["env"] if "valueFrom" in e
    }
    assert downward == {
        "THROTTLLEM_POD_NAMESPACE": "metadata.namespace",
        "THROTTLLEM_POD_NAME": "metadata.name",
        "THROTTLLEM_POD_UID": "metadata.uid",
    }
    pod_values = {
        "THROTTLLEM_POD_NAMESPACE": ENGINE_NAMESPACE,
        "THROTTLLEM_POD_NAME": "triton-throttllem-5d8f7c9b4-x2k9q",
        "THROTTLLEM_POD_UID": "1f2e3d4c-5b6a-4978-8695-a4b3c2d1e0f9",
        "THROTTLLEM_GPU_UUID": "GPU-00000000-0000-0000-0000-000000000000",  # what discovery sets
    }
    settings = sidecar_settings(monkeypatch, {**env, **plain_env(sidecar), **pod_values})
    assert (settings.actuator, settings.node_socket, settings.meter) == ("node", socket_path, "dcgm")
    assert (settings.pod_namespace, settings.pod_name, settings.pod_uid) == (
        ENGINE_NAMESPACE,
        pod_values["THROTTLLEM_POD_NAME"],
        pod_values["THROTTLLEM_POD_UID"],
    )


@needs_kubectl
def test_node_agent_holds_sys_admin_and_every_gpu_but_requests_none(
    clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = kustomize(NODE_AGENT)
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_SCHEMA_VERSION, strict=True)
    (daemonset,) = of_kind(docs, "DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    (agent,) = pod["containers"]
    context = agent["securityContext"]
    assert context["capabilities"] == {"drop": ["ALL"], "add": ["SYS_ADMIN"]}
    # Added capabilities reach root processes only; Kubernetes refuses SYS_ADMIN with no escalation.
    assert (
        context["runAsUser"] == 0
        and "allowPrivilegeEscalation" not in context
        and "privileged" not in context
    )
    assert context["readOnlyRootFilesystem"] is True
    assert "nvidia.com/gpu" not in yaml.safe_dump(agent["resources"])  # would take a GPU from workloads
    env = plain_env(agent)
    assert (env["NVIDIA_VISIBLE_DEVICES"], env["NVIDIA_DRIVER_CAPABILITIES"]) == ("all", "utility")
    assert pod["hostPID"] is True and not pod.get("hostNetwork")
    assert pod["runtimeClassName"] == "nvidia" and pod["priorityClassName"] == "system-node-critical"
    (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert term["matchExpressions"] == [
        {"key": "nvidia.com/gpu.present", "operator": "In", "values": ["true"]}
    ]
    assert {"key": "nvidia.com/gpu", "operator": "Exists"} in pod["tolerations"]
    assert daemonset["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1},
    }
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: (volumes[m["name"]], m.get("readOnly", False)) for m in agent["volumeMounts"]}
    resources, read_only = mounts["/var/lib/kubelet/pod-resources"]
    assert resources["hostPath"]["path"] == "/var/lib/kubelet/pod-resources" and read_only
    # The image's entrypoint is `throttllem`: these are the node agent's own flags and settings.
    assert build_parser().parse_args(agent["args"]).command == "node"
    for name, value in env.items():
        if name.startswith("THROTTLLEM_"):
            monkeypatch.setenv(name, value)
    settings = load_node_settings()
    assert (settings.gpu_backend, settings.pod_check, settings.lease_ttl_s) == ("nvml", "kubelet", 1.0)
    assert settings.pod_resources_socket == Path("/var/lib/kubelet/pod-resources/kubelet.sock")
    assert settings.pod_resources_socket.parent in {Path(path) for path in mounts}
    # The kubelet check ties a pod's name to its UID through the pod log directories.
    logs, read_only = mounts[str(settings.pod_logs_dir)]
    assert logs["hostPath"]["path"] == "/var/log/pods" and read_only
    assert settings.socket.parent in {Path(path) for path in mounts}


def agent_container() -> dict[str, Any]:
    (daemonset,) = of_kind(yaml_documents(NODE_AGENT / "daemonset.yaml"), "DaemonSet")
    return container(daemonset["spec"]["template"]["spec"], "node-agent")


def connects_as(uid: int, gid: int, path: Path) -> bool:
    """Whether a process of `uid` in group `gid` alone (as a container runs) may connect to `path`."""
    pid = os.fork()
    if pid == 0:  # the child: drop to uid/gid, try, report in the exit code
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX) as client:
                client.settimeout(3)
                client.connect(str(path))
            os._exit(0)
        except OSError:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def test_node_agent_answers_its_probe_and_admits_the_sidecars_group_only() -> None:
    """The DaemonSet's probe and socket group, against a real `throttllem node` (twin backend)."""
    agent = agent_container()
    liveness, readiness = (agent[probe]["exec"]["command"] for probe in ("livenessProbe", "readinessProbe"))
    assert liveness == readiness and liveness[0] == "python"
    socket_gid = int(plain_env(agent)["THROTTLLEM_NODE_SOCKET_GID"])
    sidecar = container(yaml_file(BASE / "deployment.yaml")["spec"]["template"]["spec"], SIDECAR)
    sidecar_ids = (sidecar["securityContext"]["runAsUser"], sidecar["securityContext"]["runAsGroup"])
    # A directory others may traverse, as the kubelet creates /run/throttllem (pytest's are 0700).
    directory = Path(tempfile.mkdtemp(prefix="throttllem-node-"))
    directory.chmod(0o755)
    path = directory / "node.sock"
    probe = [sys.executable, *(arg.replace("/run/throttllem/node.sock", str(path)) for arg in liveness[1:])]
    assert probe != [sys.executable, *liveness[1:]], "the probe names the agent's socket"

    def run_probe() -> int:
        return subprocess.run(probe, capture_output=True, timeout=10).returncode

    def access() -> tuple[bool, bool] | None:
        """(the sidecar's uid and group, another uid and group) may connect; None unless root."""
        if os.geteuid() != 0:
            return None
        return connects_as(*sidecar_ids, path), connects_as(sidecar_ids[0] + 1, sidecar_ids[1] + 1, path)

    async def scenario() -> tuple[int, tuple[bool, bool] | None, int]:
        setup = TwinSetup(gpu=gpu_spec("a100-sxm4-80gb"), model=model_spec("llama3-8b"), tp=1)
        async with ProcessGroup(directory / "logs") as group:
            twin = await start_twin(group, setup)
            env = {
                "THROTTLLEM_NODE_SOCKET": str(path),
                "THROTTLLEM_NODE_SOCKET_GID": str(socket_gid),
                "THROTTLLEM_NODE_GPU_BACKEND": "twin",
                "THROTTLLEM_NODE_TWIN_URLS": twin.http_url,
                "THROTTLLEM_NODE_POD_CHECK": "none",
            }
            node = await group.start("node", ["node"], env=child_env(env))
            serving = await asyncio.to_thread(run_probe)
            admitted = await asyncio.to_thread(access)
            await node.stop()
            stopped = await asyncio.to_thread(run_probe)
        return serving, admitted, stopped

    try:
        serving, admitted, stopped = asyncio.run(scenario())
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    assert (serving, stopped) == (0, 1)
    assert admitted in (None, (True, False))  # None: not root, cannot switch users to check


# --- disruptions and network ------------------------------------------------------------------


@needs_kubectl
def test_each_engine_deployment_has_a_budget_of_one_eviction() -> None:
    for build in (BASE, ENGINES):
        docs = kustomize(build)
        budgets = of_kind(docs, "PodDisruptionBudget")
        deployments = of_kind(docs, "Deployment")
        for deploy in deployments:
            labels = deploy["spec"]["template"]["metadata"]["labels"]
            (budget,) = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
            # Not minAvailable: with one replica it would block every node drain.
            assert budget["spec"]["maxUnavailable"] == 1 and "minAvailable" not in budget["spec"]
            assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
        assert len(budgets) == len(deployments)


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A label selector (matchLabels only: the manifests use no matchExpressions) against labels."""
    assert set(selector) <= {"matchLabels"}, selector
    return selector.get("matchLabels", {}).items() <= labels.items()


def admitted_ports(
    policies: Sequence[Mapping[str, Any]],
    pod: Mapping[str, Any],
    pod_labels: Mapping[str, str],
    peer_namespace: str,
    peer_labels: Mapping[str, str],
) -> set[int]:
    """Container ports of `pod` (in the engine namespace) that a pod elsewhere may connect to."""
    ports = {p["name"]: p["containerPort"] for c in pod["containers"] for p in c.get("ports", [])}
    selecting = [p for p in policies if selects(p["spec"]["podSelector"], pod_labels)]
    if not selecting:
        return set(ports.values())
    namespace_labels = {"kubernetes.io/metadata.name": peer_namespace}
    admitted: set[int] = set()
    for policy in selecting:
        assert "Ingress" in policy["spec"]["policyTypes"]
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from", [])
            if peers and not any(
                (
                    selects(peer["namespaceSelector"], namespace_labels)
                    if "namespaceSelector" in peer
                    else peer_namespace == policy["metadata"]["namespace"]
                )
                and selects(peer.get("podSelector", {}), peer_labels)
                for peer in peers
            ):
                continue
            named = [p["port"] for p in rule.get("ports", [])] or list(ports)
            admitted |= {ports[port] if isinstance(port, str) else port for port in named}
    return admitted


@needs_kubectl
def test_network_policy_leaves_triton_reachable_only_through_the_gateway() -> None:
    for build in (BASE, ENGINES):
        docs = kustomize(build)
        policies = of_kind(docs, "NetworkPolicy")
        for deploy in of_kind(docs, "Deployment"):
            pod = deploy["spec"]["template"]["spec"]
            labels = deploy["spec"]["template"]["metadata"]["labels"]
            sidecar = {p["containerPort"] for p in container(pod, SIDECAR)["ports"]}
            triton = {p["name"]: p["containerPort"] for p in container(pod, "triton")["ports"]}
            assert sidecar == {9000, 9401} and set(triton.values()) == {8000, 8001, 8002}
            ports_from = partial(admitted_ports, policies, pod, labels)
            # A client anywhere, even a pod beside it in the namespace: the gateway and /metrics only.
            assert ports_from("clients", {"app": "load"}) == sidecar
            assert ports_from(ENGINE_NAMESPACE, {"app": "other"}) == sidecar
            # Prometheus also reads Triton's metrics; nobody gets Triton's HTTP or gRPC port.
            assert ports_from("monitoring", {"app": "prometheus"}) == sidecar | {triton["metrics"]}


# --- Prometheus ---------------------------------------------------------------------------------


@needs_kubectl
def test_base_applies_without_prometheus_operator_and_its_overlay_adds_monitor_and_rules() -> None:
    def operator_objects(build: Path) -> list[dict[str, Any]]:
        return [d for d in kustomize(build) if d["apiVersion"].startswith("monitoring.coreos.com/")]

    for build in (BASE, ENGINES, COORDINATOR, NODE_AGENT, OVERLAYS / "dryrun", OVERLAYS / "otel"):
        assert operator_objects(build) == [], build
    operator = operator_objects(PROMETHEUS_OPERATOR)
    assert sorted(d["kind"] for d in operator) == ["PrometheusRule", "ServiceMonitor"]
    assert {d["metadata"]["namespace"] for d in operator} == {ENGINE_NAMESPACE}
    (rule,) = of_kind(operator, "PrometheusRule")
    assert rule["spec"] == yaml_file(ALERTS)  # one set of alerts for both kinds of Prometheus


@needs_kubectl
def test_engines_are_scraped_through_their_metrics_service(tmp_path: Path) -> None:
    """The monitoring objects added to the engines' build, as its kustomization says to."""
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": [os.path.relpath(p, tmp_path) for p in (ENGINES, MONITORING)]}),
        encoding="utf-8",
    )
    docs = kustomize(tmp_path)
    (monitor,) = of_kind(docs, "ServiceMonitor")
    scraped = [
        s for s in of_kind(docs, "Service") if selects(monitor["spec"]["selector"], s["metadata"]["labels"])
    ]
    by_name = {s["metadata"]["name"]: {p["name"] for p in s["spec"]["ports"]} for s in scraped}
    endpoints = {e["port"] for e in monitor["spec"]["endpoints"]}
    # The headless Service has every engine, serving or not, and both metrics ports.
    assert by_name["triton-throttllem-metrics"] == endpoints == {"sidecar-metrics", "triton-metrics"}
    assert of_kind(docs, "PrometheusRule")


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml_file(ALERTS)["groups"] for rule in group["rules"]]


def test_alerts_cover_the_failures_and_query_only_metrics_that_exist() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {
        "ThrottllemSidecarDownWhileLocked",
        "ThrottllemNodeAgentDown",
        "ThrottllemTelemetryStale",
        "ThrottllemLoopRestarting",
        "ThrottllemNotControlling",
        "ThrottllemSloAtRisk",
    }
    used = set().union(*(metric_names(rule["expr"]) for rule in rules))
    assert used - exported_metric_names() - ALERT_EXTERNAL_METRICS == set()
    # State-set values the alerts compare with are the modes the sidecar reports.
    modes = {"throttllem_loop_mode": LoopMode, "throttllem_actuator_mode": ActuatorMode}
    for rule in rules:
        for family, value in re.findall(r'(throttllem_\w+_mode)="(\w+)"', rule["expr"]):
            assert value in {mode.value for mode in modes[family]}, (rule["alert"], value)
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


@needs_promtool
def test_alert_rules_pass_promtool_check() -> None:
    result = subprocess.run(
        ["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


@needs_promtool
def test_alerts_fire_on_the_failure_and_not_on_the_normal_case() -> None:
    tested = {
        case["alertname"] for test in yaml_file(ALERTS_TEST)["tests"] for case in test["alert_rule_test"]
    }
    assert tested >= {"ThrottllemSidecarDownWhileLocked", "ThrottllemTelemetryStale", "ThrottllemSloAtRisk"}
    result = subprocess.run(
        ["promtool", "test", "rules", ALERTS_TEST.name],
        cwd=ALERTS_TEST.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_deploy_readme_lists_paths_that_exist() -> None:
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    listed = re.findall(r"^\| `([^`]+)` \|", readme, flags=re.MULTILINE)
    assert {"k8s/node-agent/", "k8s/namespace/", "k8s/overlays/prometheus-operator/"} <= set(listed)
    assert [path for path in listed if not (DEPLOY / path).exists()] == []
