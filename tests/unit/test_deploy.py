"""The files under deploy/: they parse, and they agree with the code they deploy.

A renamed setting, metric, port, subcommand or file fails here rather than on a cluster: every
THROTTLLEM_* variable must be a setting whose value `throttllem run` accepts, probes must reach
/healthz on the configured port, and the dashboard may only query metrics the code exports.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from agent.catalog import gpu_spec, model_spec
from agent.cli import build_parser
from agent.config import ENV_PREFIX, Settings, env_name, load_settings
from agent.coordinator.names import SIZE_LABEL
from agent.coordinator.settings import load_coordinator_settings
from agent.shipped import SHIPPED_MODELS_DIR
from agent.sidecar.energy import EnergySampler
from agent.sidecar.metrics import SidecarMetrics
from agent.twin.server.gpu_control import gpu_uuids
from agent.twin.server.metrics import TritonMetrics
from agent.twin.setup import TwinSetup
from tests.unit.sidecar_fakes import ScriptedPolicy, rig

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
BASE = DEPLOY / "k8s" / "base"
OVERLAYS = DEPLOY / "k8s" / "overlays"
ENGINES = DEPLOY / "k8s" / "engines"
COORDINATOR = DEPLOY / "k8s" / "coordinator"
COMPOSE = DEPLOY / "compose" / "docker-compose.yaml"
DASHBOARD = DEPLOY / "grafana" / "throttllem-dashboard.json"
SIDECAR = "throttllem"  # the sidecar's container name in the pod
PROBES = ("startupProbe", "livenessProbe", "readinessProbe")
# Queried by the dashboard but exported by neither our code nor Triton: dcgm-exporter's default
# SM clock (reference/interfaces.md §5), the only source of the effective clock.
EXTERNAL_METRICS = frozenset({"DCGM_FI_DEV_SM_CLOCK"})
_VARIABLE = re.compile(rf"\b{ENV_PREFIX}[A-Z0-9_]*[A-Z0-9]\b")


# --- reading the files --------------------------------------------------------------------------


def yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def yaml_file(path: Path) -> Any:
    (doc,) = yaml_documents(path)
    return doc


def env_file(path: Path) -> dict[str, str]:
    """A kustomize env file: KEY=VALUE lines; blank lines and # comments skipped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    pairs = [line.split("=", 1) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return {key.strip(): value for key, value in pairs}


def deployment() -> dict[str, Any]:
    return yaml_file(BASE / "deployment.yaml")


def container(pod_spec: Mapping[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in pod_spec["containers"] if c["name"] == name]
    return found


def port_number(spec: Mapping[str, Any], port: int | str) -> int:
    """A container port given by number or by name."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in spec["ports"] if p["name"] == port]
    return int(number)


def url_port(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None, url
    return port


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [
        (word.upper(), rest.strip())
        for word, _, rest in (line.strip().partition(" ") for line in joined.splitlines())
        if word
    ]


def dockerfile(instruction: str) -> list[str]:
    return [args for word, args in dockerfile_instructions() if word == instruction]


def twin_uuid() -> str:
    setup = TwinSetup(gpu=gpu_spec("a100-sxm4-80gb"), model=model_spec("llama3-8b"), tp=1)
    return gpu_uuids(setup)[0]


def discovery_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("triton_gpu_uuid", BASE / "triton_gpu_uuid.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def sidecar_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A clean THROTTLLEM_* environment, run from the repository as the image runs from /app."""
    for field in Settings.model_fields:
        monkeypatch.delenv(env_name(field), raising=False)
    monkeypatch.chdir(REPO)
    yield


def sidecar_settings(monkeypatch: pytest.MonkeyPatch, env: Mapping[str, str]) -> Settings:
    """What `throttllem run` makes of `env`: each value and their combination checked."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings(sidecar=True)


# --- every file ---------------------------------------------------------------------------------


def test_every_yaml_and_json_file_parses() -> None:
    yamls = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    jsons = sorted(DEPLOY.rglob("*.json"))
    assert len(yamls) >= 12 and len(jsons) >= 1
    for path in yamls:
        assert yaml_documents(path), path
    for path in jsons:
        assert json.loads(path.read_text(encoding="utf-8")), path


def test_every_throttllem_variable_is_a_setting() -> None:
    from agent.coordinator.settings import CoordinatorSettings, coordinator_env
    from agent.node.settings import NodeSettings, node_env

    known = {env_name(field) for field in Settings.model_fields}
    known |= {coordinator_env(field) for field in CoordinatorSettings.model_fields}
    known |= {node_env(field) for field in NodeSettings.model_fields}
    used: dict[str, set[str]] = {}
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            for name in _VARIABLE.findall(path.read_text(encoding="utf-8")):
                used.setdefault(name, set()).add(str(path.relative_to(DEPLOY)))
    assert len(used) >= 15
    assert {name: files for name, files in used.items() if name not in known} == {}


# --- Kubernetes ---------------------------------------------------------------------------------


def test_kustomizations_name_files_that_exist() -> None:
    for kustomization in DEPLOY.rglob("kustomization.yaml"):
        spec = yaml_file(kustomization)
        named = [
            *spec.get("resources", []),
            *spec.get("components", []),
            *(p["path"] for p in spec.get("patches", []) if "path" in p),
            *(
                f
                for g in spec.get("configMapGenerator", [])
                for f in [*g.get("envs", []), *g.get("files", [])]
            ),
        ]
        assert named or spec.get("patches"), kustomization
        for name in named:
            assert (kustomization.parent / name).exists(), f"{kustomization}: {name}"


def test_base_settings_are_what_the_brief_deploys(sidecar_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    env = env_file(BASE / "throttllem.env")
    # The GPU is found at start-up (triton_gpu_uuid.py), so the manifests cannot name it.
    assert not {"THROTTLLEM_GPU_UUIDS", "THROTTLLEM_GPU_UUID", "THROTTLLEM_GPU_INDEX"} & set(env)
    settings = sidecar_settings(monkeypatch, {**env, "THROTTLLEM_GPU_UUID": twin_uuid()})
    # No GPU device in the sidecar: clocks through the node agent, energy from dcgm-exporter.
    assert (settings.engine, settings.actuator, settings.meter) == ("triton", "node", "dcgm")
    assert settings.metrics_url == "http://127.0.0.1:8002/metrics"
    assert settings.engine_url == "http://127.0.0.1:8000"
    assert (settings.gateway_port, settings.sidecar_port) == (9000, 9401)
    assert (settings.policy, settings.slo) == ("throttllem", "mlperf-server")


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
def test_dryrun_overlay_only_stops_actuating(sidecar_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    (generator,) = yaml_file(OVERLAYS / "dryrun" / "kustomization.yaml")["configMapGenerator"]
    assert (generator["name"], generator["behavior"]) == ("throttllem", "merge")
    literals = dict(literal.split("=", 1) for literal in generator["literals"])
    assert literals == {"THROTTLLEM_ACTUATOR": "dryrun"}
    env = {**env_file(BASE / "throttllem.env"), **literals, "THROTTLLEM_GPU_UUID": twin_uuid()}
    assert sidecar_settings(monkeypatch, env).actuator == "dryrun"
    # Nor does it need the node agent: its socket's hostPath is gone, the rest is the base's.
    base_pod = deployment()["spec"]["template"]["spec"]
    (deploy,) = [d for d in kustomize(OVERLAYS / "dryrun") if d["kind"] == "Deployment"]
    pod = deploy["spec"]["template"]["spec"]
    assert [v for v in pod["volumes"] if "hostPath" in v] == []
    assert {v["name"] for v in base_pod["volumes"]} - {v["name"] for v in pod["volumes"]} == {"node-agent"}
    assert container(pod, SIDECAR)["securityContext"] == container(base_pod, SIDECAR)["securityContext"]


def test_sidecar_probes_hit_healthz_on_the_configured_port() -> None:
    env = env_file(BASE / "throttllem.env")
    sidecar = container(deployment()["spec"]["template"]["spec"], SIDECAR)
    for probe in PROBES:
        action = sidecar[probe]["httpGet"]
        assert action["path"] == "/healthz", probe
        assert port_number(sidecar, action["port"]) == int(env["THROTTLLEM_SIDECAR_PORT"]), probe
    assert port_number(sidecar, "gateway") == int(env["THROTTLLEM_GATEWAY_PORT"])


def test_sidecar_has_no_gpu_and_no_privilege() -> None:
    pod = deployment()["spec"]["template"]["spec"]
    triton, sidecar = container(pod, "triton"), container(pod, SIDECAR)
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in str(sidecar["resources"])
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "void"  # the NVIDIA runtime injects no device, no library
    context = sidecar["securityContext"]
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
    assert context["runAsUser"] == int(dockerfile("USER")[-1]) != 0
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    # SIGKILL must not come before the sidecar's own hard exit, which comes after the clock reset.
    shutdown_s = float(env_file(BASE / "throttllem.env")["THROTTLLEM_SHUTDOWN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] > shutdown_s + 5


def test_sidecar_starts_through_gpu_discovery() -> None:
    pod = deployment()["spec"]["template"]["spec"]
    sidecar = container(pod, SIDECAR)
    generators = {g["name"]: g for g in yaml_file(BASE / "kustomization.yaml")["configMapGenerator"]}
    (script,) = generators["throttllem-gpu-discovery"]["files"]
    (volume,) = [
        v for v in pod["volumes"] if v.get("configMap", {}).get("name") == "throttllem-gpu-discovery"
    ]
    (mount,) = [m for m in sidecar["volumeMounts"] if m["name"] == volume["name"]]
    assert sidecar["command"] == ["python", f"{mount['mountPath']}/{script}"]
    build_parser().parse_args(sidecar["args"])  # what the script execs `throttllem` with
    assert sidecar["envFrom"] == [{"configMapRef": {"name": "throttllem"}}]
    assert "throttllem" in generators


def test_triton_serves_where_the_sidecar_looks() -> None:
    env = env_file(BASE / "throttllem.env")
    triton = container(deployment()["spec"]["template"]["spec"], "triton")
    args = dict(arg.removeprefix("--").split("=", 1) for arg in triton["args"])
    assert int(args["http-port"]) == url_port(env["THROTTLLEM_ENGINE_URL"]) == port_number(triton, "http")
    metrics_url = env["THROTTLLEM_ENGINE_METRICS_URL"]
    assert int(args["metrics-port"]) == url_port(metrics_url) == port_number(triton, "metrics")
    assert args["allow-gpu-metrics"] == "true"  # the sidecar finds its GPU in them
    for probe in PROBES:
        assert triton[probe]["httpGet"]["path"].startswith("/v2/health/")
    assert "<" not in triton["image"]  # kustomize's `images:` could not replace an invalid reference


def test_service_sends_clients_through_the_gateway_and_is_scraped() -> None:
    pod = deployment()["spec"]["template"]["spec"]
    service = yaml_file(BASE / "service.yaml")
    monitor = yaml_file(OVERLAYS / "prometheus-operator" / "monitoring" / "servicemonitor.yaml")
    by_name = {p["name"]: p for p in service["spec"]["ports"]}
    env = env_file(BASE / "throttllem.env")

    def target(name: str, container_name: str) -> int:
        return port_number(container(pod, container_name), by_name[name]["targetPort"])

    assert target("http", SIDECAR) == int(env["THROTTLLEM_GATEWAY_PORT"])
    assert target("sidecar-metrics", SIDECAR) == int(env["THROTTLLEM_SIDECAR_PORT"])
    assert target("triton-metrics", "triton") == url_port(env["THROTTLLEM_ENGINE_METRICS_URL"])
    assert "grpc" not in by_name  # it would bypass the gateway
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"sidecar-metrics", "triton-metrics"}
    labels = deployment()["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


def test_otel_overlay_exports_over_http_with_pod_attributes() -> None:
    patch = yaml_file(OVERLAYS / "otel" / "otlp-env.yaml")
    env = container(patch["spec"]["template"]["spec"], SIDECAR)["env"]
    values = {e["name"]: e.get("value") for e in env}
    assert url_port(values["OTEL_EXPORTER_OTLP_ENDPOINT"]) == 4318  # OTLP/HTTP: the sidecar has no gRPC
    assert values["OTEL_SERVICE_NAME"]
    attributes = values["OTEL_RESOURCE_ATTRIBUTES"]
    assert {"k8s.pod.name", "k8s.node.name"} <= {pair.split("=")[0] for pair in attributes.split(",")}
    # Kubernetes expands $(VAR) only from variables defined before it in the list.
    defined_before = [e["name"] for e in env[: [e["name"] for e in env].index("OTEL_RESOURCE_ATTRIBUTES")]]
    referenced = re.findall(r"\$\((\w+)\)", attributes)
    assert referenced and set(referenced) <= set(defined_before)
    field_paths = {e["valueFrom"]["fieldRef"]["fieldPath"] for e in env if "valueFrom" in e}
    assert {"metadata.name", "spec.nodeName"} <= field_paths


K8S_SCHEMA_VERSION = "1.30"  # the oldest Kubernetes release these manifests are checked against


def kustomize(overlay: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None
    rendered = subprocess.run(
        [kubectl, "kustomize", str(overlay)], check=True, capture_output=True, text=True, timeout=30
    ).stdout
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


# Kinds the base's builds hold: plain Kubernetes, so they apply on any cluster.
BASE_KINDS = {"Namespace", "ConfigMap", "Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget"}
PROMETHEUS_OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}  # CRDs: not in the Kubernetes schemas


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
@pytest.mark.parametrize(
    ("overlay", "actuator", "kinds"),
    [
        (BASE, "node", BASE_KINDS),
        (OVERLAYS / "dryrun", "dryrun", BASE_KINDS),
        (OVERLAYS / "otel", "node", BASE_KINDS),
        (OVERLAYS / "prometheus-operator", "node", BASE_KINDS | PROMETHEUS_OPERATOR_KINDS),
    ],
)
def test_kustomize_renders(overlay: Path, actuator: str, kinds: set[str]) -> None:
    docs = kustomize(overlay)
    (deploy,) = [d for d in docs if d["kind"] == "Deployment"]
    sidecar = container(deploy["spec"]["template"]["spec"], SIDECAR)
    (config_map,) = [
        d
        for d in docs
        if d["kind"] == "ConfigMap"
        and d["metadata"]["name"].startswith("throttllem-")
        and "THROTTLLEM_ACTUATOR" in d.get("data", {})
    ]
    assert sidecar["envFrom"] == [{"configMapRef": {"name": config_map["metadata"]["name"]}}]
    assert config_map["data"]["THROTTLLEM_ACTUATOR"] == actuator
    assert sidecar["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert {d["kind"] for d in docs} == kinds
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"throttllem"}
    for doc in docs:
        if doc["kind"] not in PROMETHEUS_OPERATOR_KINDS:
            kubernetes_validate.validate(doc, K8S_SCHEMA_VERSION, strict=True)


def triton_ranks(triton: Mapping[str, Any]) -> list[list[str]]:
    """The tritonserver command lines the Triton container starts: one, or one per MPI rank."""
    argv = [*triton["command"], *triton.get("args", [])]
    if argv[0] != "mpirun":
        return [argv]
    ranks, rank = [], []
    for arg in [*argv[1:], ":"]:
        if arg == ":":
            ranks.append(rank[rank.index("tritonserver") :])
            rank = []
        else:
            rank.append(arg)
    return ranks


def flags(argv: list[str]) -> dict[str, list[str]]:
    """`--name=value` flags of one command line, every value of each."""
    out: dict[str, list[str]] = {}
    for arg in argv[1:]:
        name, _, value = arg.removeprefix("--").partition("=")
        out.setdefault(name, []).append(value)
    return out


def rendered_env(docs: list[dict[str, Any]], pod: Mapping[str, Any]) -> dict[str, str]:
    """The sidecar's THROTTLLEM_* settings in a rendered pod: its ConfigMap's data."""
    (ref,) = container(pod, SIDECAR)["envFrom"]
    name = ref["configMapRef"]["name"]
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name]
    return dict(config_map["data"])


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
def test_engines_are_one_deployment_per_size_the_coordinator_finds_steers_and_may_scale(
    sidecar_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = kustomize(ENGINES)
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_SCHEMA_VERSION, strict=True)
    coordinator_env = {
        e["name"]: e["value"]
        for d in kustomize(COORDINATOR)
        if d["kind"] == "Deployment"
        for e in container(d["spec"]["template"]["spec"], "coordinator")["env"]
    }
    for name, value in coordinator_env.items():
        monkeypatch.setenv(name, value)
    coordinator = load_coordinator_settings()
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(deployments) == {coordinator.deployment_of(size) for size in coordinator.tp_sizes}
    pods = {}
    for size in coordinator.tp_sizes:
        deploy = deployments[coordinator.deployment_of(size)]
        assert "replicas" not in deploy["spec"], "an apply would undo the coordinator's scaling"
        pod = deploy["spec"]["template"]["spec"]
        labels = deploy["spec"]["template"]["metadata"]["labels"]
        assert labels[SIZE_LABEL] == deploy["spec"]["selector"]["matchLabels"][SIZE_LABEL] == str(size)
        triton = container(pod, "triton")
        assert triton["resources"]["limits"]["nvidia.com/gpu"] == size
        ranks = triton_ranks(triton)
        assert len(ranks) == size, f"tp{size}: one tritonserver per GPU of a TP{size} engine"
        env = rendered_env(docs, pod)
        for rank, argv in enumerate(ranks):
            rank_flags = flags(argv)
            assert rank_flags["model-repository"] == [f"/models/tp{size}"]
            assert rank_flags["http-port"] == [str(url_port(env["THROTTLLEM_ENGINE_URL"]))]
            assert rank_flags["metrics-port"] == [str(url_port(env["THROTTLLEM_ENGINE_METRICS_URL"]))]
            if size > 1:
                assert rank_flags["backend-config"] == [f"python,shm-region-prefix-name=prefix{rank}_"]
                assert ("load-model" in rank_flags) is (rank > 0), "ranks > 0 load tensorrt_llm only"
        setup = TwinSetup(
            gpu=gpu_spec(env["THROTTLLEM_GPU"]), model=model_spec(env["THROTTLLEM_MODEL"]), tp=size
        )
        uuids = ",".join(gpu_uuids(setup))
        settings = sidecar_settings(monkeypatch, {**env, "THROTTLLEM_GPU_UUIDS": uuids})
        assert settings.tp == size and len(settings.selected_gpu_uuids) == size
        assert (settings.gpu, settings.model) == (coordinator.gpu, coordinator.model)
        pods[size] = labels
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    selector = services[coordinator.service]["spec"]["selector"]
    assert [s for s, labels in pods.items() if selector.items() <= labels.items()] == [coordinator.first_size]
    (metrics,) = [s for name, s in services.items() if name != coordinator.service]
    assert all(metrics["spec"]["selector"].items() <= labels.items() for labels in pods.values())
    (role,) = [d for d in kustomize(COORDINATOR) if d["kind"] == "Role"]
    named = {
        resource: set(rule["resourceNames"])
        for rule in role["rules"]
        if "resourceNames" in rule
        for resource in rule["resources"]
    }
    assert named["deployments/scale"] == named["deployments"] == set(deployments)
    assert named["services"] == {coordinator.service}


# --- Docker -------------------------------------------------------------------------------------


def test_dockerfile_runs_the_console_script() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    (entrypoint,) = dockerfile("ENTRYPOINT")
    (cmd,) = dockerfile("CMD")
    assert json.loads(entrypoint) == ["throttllem"] and "throttllem" in scripts
    assert json.loads(cmd) == ["run"]
    assert build_parser().parse_args(json.loads(cmd)).command == "run"


def test_dockerfile_installs_the_package_with_its_models_and_policies() -> None:
    workdir = Path(dockerfile("WORKDIR")[-1])
    copies = {tuple(args.split()) for args in dockerfile("COPY") if not args.startswith("--from")}
    # The models and presets are package data: the image installs the package and copies nothing else.
    assert Settings().models_dir == SHIPPED_MODELS_DIR
    assert SHIPPED_MODELS_DIR.is_relative_to(REPO / "agent")
    assert copies == {("pyproject.toml", "README.md", "./"), ("agent", "./agent")}
    assert workdir.is_absolute()
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").split()
    assert {"!agent", "!pyproject.toml", "!README.md"} <= set(ignored)
    assert dockerfile("USER")[-1] != "0"


def test_dockerfile_healthcheck_hits_healthz_on_the_default_port() -> None:
    (healthcheck,) = dockerfile("HEALTHCHECK")
    assert "/healthz" in healthcheck
    default = Settings.model_fields["sidecar_port"].default
    assert f"'THROTTLLEM_SIDECAR_PORT', '{default}'" in healthcheck
    assert str(default) in dockerfile("EXPOSE")[0].split()


# --- the local stack ------------------------------------------------------------------------------


def compose_services() -> dict[str, Any]:
    return yaml_file(COMPOSE)["services"]


def test_compose_sidecar_settings_work_with_the_twin(
    sidecar_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose_services()
    env = {k: v for k, v in services["sidecar"]["environment"].items() if k.startswith(ENV_PREFIX)}
    settings = sidecar_settings(monkeypatch, env)
    assert (settings.actuator, settings.meter, settings.gateway_port) == ("twin", "twin", 9000)
    twin_args = build_parser().parse_args(services["twin"]["command"])
    assert twin_args.command == "twin" and twin_args.twin == "serve"
    assert build_parser().parse_args(services["sidecar"]["command"]).command == "run"
    # Both sides describe the same engine and GPU.
    assert {k: v for k, v in services["twin"]["environment"].items() if k in env} == {
        k: env[k] for k in ("THROTTLLEM_GPU", "THROTTLLEM_MODEL", "THROTTLLEM_TP")
    }
    assert urlsplit(settings.engine_url).hostname == urlsplit(settings.metrics_url).hostname == "twin"
    assert url_port(settings.engine_url) == twin_args.http_port == url_port(settings.twin_url or "")
    assert url_port(settings.metrics_url) == twin_args.metrics_port


def test_compose_load_goes_through_the_gateway(sidecar_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose_services()
    load = services["load"]
    for name, value in load["environment"].items():
        monkeypatch.setenv(name, value)
    args = build_parser().parse_args(load["command"])  # defaults read the environment, as in the image
    gateway = f"http://sidecar:{services['sidecar']['environment']['THROTTLLEM_GATEWAY_PORT']}"
    assert (args.command, args.url) == ("load", gateway)
    assert (args.gpu, args.model, str(args.tp)) == tuple(
        services["twin"]["environment"][f"{ENV_PREFIX}{key}"] for key in ("GPU", "MODEL", "TP")
    )


def test_compose_healthchecks_and_scrapes_use_the_configured_ports() -> None:
    services = compose_services()
    env = services["sidecar"]["environment"]
    sidecar_port = env["THROTTLLEM_SIDECAR_PORT"]
    assert f"127.0.0.1:{sidecar_port}/healthz" in " ".join(services["sidecar"]["healthcheck"]["test"])
    assert f"127.0.0.1:{env['THROTTLLEM_GATEWAY_PORT']}" not in str(services["sidecar"]["healthcheck"])
    twin_args = build_parser().parse_args(services["twin"]["command"])
    assert f"127.0.0.1:{twin_args.http_port}/v2/health/ready" in " ".join(
        services["twin"]["healthcheck"]["test"]
    )
    prometheus = yaml_file(DEPLOY / "compose" / "prometheus.yml")
    targets = {
        job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]]
        for job in prometheus["scrape_configs"]
    }
    assert targets == {
        "triton": [f"twin:{twin_args.metrics_port}"],
        "throttllem": [f"sidecar:{sidecar_port}"],
    }
    pods = {c["labels"]["pod"] for job in prometheus["scrape_configs"] for c in job["static_configs"]}
    assert len(pods) == 1  # the dashboard pairs Triton's and the sidecar's series by `pod`
    assert int(services["sidecar"]["stop_grace_period"].removesuffix("s")) > int(
        Settings.model_fields["shutdown_timeout_s"].default
    )


def test_compose_mounts_files_that_exist() -> None:
    for name, service in compose_services().items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source}"


def test_traces_flow_from_the_sidecar_through_the_collector_to_jaeger() -> None:
    services = compose_services()
    endpoint = urlsplit(services["sidecar"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert endpoint.hostname in services and endpoint.port == 4318
    collector = yaml_file(DEPLOY / "otel" / "collector.yaml")
    http = collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert http.endswith(f":{endpoint.port}")
    (traces,) = collector["service"]["pipelines"].values()
    for kind in ("receivers", "processors", "exporters"):
        assert set(traces[kind]) <= set(collector[kind]), kind
    jaeger = collector["exporters"]["otlp/jaeger"]["endpoint"]
    assert jaeger.split(":")[0] in services
    mounted = [v for v in services["otel-collector"]["volumes"] if v.startswith("../otel/collector.yaml:")]
    assert mounted and f"--config={mounted[0].split(':')[1]}" in services["otel-collector"]["command"]


def test_grafana_provisions_the_dashboard() -> None:
    grafana = compose_services()["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    (provider,) = yaml_file(DEPLOY / "grafana" / "provisioning" / "dashboards" / "dashboards.yaml")[
        "providers"
    ]
    assert mounts["../grafana/throttllem-dashboard.json"].startswith(provider["options"]["path"] + "/")
    datasources = yaml_file(DEPLOY / "grafana" / "provisioning" / "datasources" / "datasources.yaml")
    prometheus = [d for d in datasources["datasources"] if d["type"] == "prometheus"]
    assert len(prometheus) == 1 and urlsplit(prometheus[0]["url"]).hostname in compose_services()


# --- the dashboard ------------------------------------------------------------------------------

_PROMQL_WORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"})
_PROMQL_WORDS |= {"and", "or", "unless"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (or a Grafana `label_values(...)` query)."""
    values = re.fullmatch(r"\s*label_values\(\s*([A-Za-z_:][\w:]*)?.*\)\s*", expr)
    if values is not None:
        return {values.group(1)} if values.group(1) else set()
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\w+", "", expr)  # dashboard variables
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", expr):
        if not expr[match.end() :].lstrip().startswith("(") and match.group() not in _PROMQL_WORDS:
            names.add(match.group())
    return names


def test_metric_names_finds_every_selector() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (pod, le) (rate(a_bucket{pod=~"$pod",x="b c"}[$__rate_interval])))'
        " / on (pod) group_left c_total * 60 + d"
    )
    assert metric_names(expr) == {"a_bucket", "c_total", "d"}
    assert metric_names('label_values(e_info{pod=~"$pod"}, pod)') == {"e_info"}


def exported_metric_names() -> set[str]:
    """Every sample name the sidecar's /metrics and the twin's (Triton's) metrics port can show."""
    r = rig(ScriptedPolicy([1050]))
    sidecar = SidecarMetrics(r.loop, r.tracker, EnergySampler(None), {"engine": "triton"}, lambda: None)
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "info": ("_info",),
    }
    names = {
        family.name + suffix
        for family in sidecar.registry.collect()
        for suffix in suffixes.get(family.type, ("",))
    }
    triton = TritonMetrics(["ensemble"], [twin_uuid()]).text()
    names |= {line.split("{")[0].split(" ")[0] for line in triton.splitlines() if line and line[0] != "#"}
    return names


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def test_dashboard_queries_only_metrics_the_code_exports() -> None:
    exported = exported_metric_names()
    used = set().union(*(metric_names(q) for q in dashboard_queries()))
    assert {
        "throttllem_sm_clock_mhz",
        "throttllem_decision_seconds_bucket",
        "throttllem_energy_joules_total",
        "throttllem_tokens_per_joule",
        "throttllem_min_slack_seconds",
        "throttllem_requests_admitted_total",
        "throttllem_requests_held",
        "throttllem_requests_rejected_total",
        "throttllem_telemetry_stale",
        "throttllem_loop_restarts_total",
        "nv_gpu_power_usage",
        "nv_energy_consumption",
        "nv_trt_llm_request_metrics",
        "nv_trt_llm_kv_cache_block_metrics",
    } <= used
    assert used - exported - EXTERNAL_METRICS == set()


def test_dashboard_label_values_exist() -> None:
    text = TritonMetrics(["ensemble"], [twin_uuid()]).text()
    for query in dashboard_queries():
        for label, value in re.findall(r'(\w+)="([\w|]+)"', query):
            if label.startswith(("request_type", "kv_cache_block_type", "inflight_batcher")):
                for one in value.split("|"):
                    assert f'{label}="{one}"' in text, (label, one)


def test_dashboard_uses_its_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        sources = [panel["datasource"], *(t["datasource"] for t in panel["targets"])]
        assert all(s == {"type": "prometheus", "uid": "${datasource}"} for s in sources), panel["title"]
        assert all(q["expr"].strip() for q in panel["targets"]), panel["title"]


# --- GPU discovery ------------------------------------------------------------------------------


def test_discovery_reads_the_gpu_from_triton_metrics() -> None:
    script = discovery_script()
    one = twin_uuid()
    assert script.gpu_uuids(TritonMetrics(["ensemble"], [one]).text()) == [one]
    two = sorted([one, "GPU-00000000-0000-0000-0000-000000000001"])
    assert script.gpu_uuids(TritonMetrics(["ensemble"], two).text()) == two
    readme = (REPO / "tests" / "unit" / "fixtures" / "triton_trtllm_readme.prom").read_text(encoding="utf-8")
    assert script.gpu_uuids(readme) == []  # TRT-LLM families only: no GPU yet


def test_discovery_waits_then_execs_the_sidecar(monkeypatch: pytest.MonkeyPatch) -> None:
    script = discovery_script()
    pages = iter([None, "", TritonMetrics(["ensemble"], [twin_uuid()]).text()])
    execs: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(script, "scrape", lambda url: next(pages))
    monkeypatch.setattr(script.time, "sleep", lambda s: None)
    monkeypatch.setattr(script.os, "execvp", lambda file, args: execs.append((file, args)))
    for name in script.SELECTORS:
        monkeypatch.delenv(f"THROTTLLEM_{name}", raising=False)
    script.main(["run", "--json-logs"])
    assert execs == [("throttllem", ["throttllem", "run", "--json-logs"])]
    assert script.os.environ["THROTTLLEM_GPU_UUIDS"] == twin_uuid()


def test_discovery_selects_every_gpu_of_a_tp_engine_and_keeps_a_given_selection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    script = discovery_script()
    two = sorted([twin_uuid(), "GPU-00000000-0000-0000-0000-000000000001"])
    monkeypatch.setattr(script, "scrape", lambda url: TritonMetrics(["ensemble"], two).text())
    execs: list[list[str]] = []
    monkeypatch.setattr(script.os, "execvp", lambda file, args: execs.append(args))
    for name in script.SELECTORS:
        monkeypatch.delenv(f"THROTTLLEM_{name}", raising=False)
    script.main(["run"])
    assert script.os.environ["THROTTLLEM_GPU_UUIDS"] == ",".join(two)
    settings = sidecar_settings(monkeypatch, {"THROTTLLEM_TP": "2", "THROTTLLEM_ACTUATOR": "nvml"})
    assert settings.selected_gpu_uuids == tuple(two)
    monkeypatch.delenv("THROTTLLEM_GPU_UUIDS")
    monkeypatch.setenv("THROTTLLEM_GPU_UUID", "GPU-given")
    script.main(["run"])
    assert "THROTTLLEM_GPU_UUIDS" not in script.os.environ
    assert execs == [["throttllem", "run"], ["throttllem", "run"]]
