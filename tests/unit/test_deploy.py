"""Deployment files render and validate offline: the compose GPU override, the Kubernetes manifests."""

from __future__ import annotations

import os
import subprocess

import kubernetes_validate
import pytest
import yaml

from tests.support import REPO, require_tool

K8S_VERSIONS = ("1.27.0", kubernetes_validate.utils.latest_version())  # gRPC probes are GA from 1.27


def compose_config(*files: str) -> dict:
    compose = require_tool(("docker-compose",), "apt-get install docker-compose")
    args = [compose] + [a for f in files for a in ("-f", f)] + ["config"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTRELAY_")}  # the defaults
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return yaml.safe_load(out.stdout)["services"]


def gpu_ids(service: dict) -> list[str]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return [i for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for i in d["device_ids"]]


def read_only_mount(volume: str | dict) -> tuple[str, bool]:
    """(target, read only): docker-compose 1.29 prints "SRC:/data:ro"; Compose v2 prints {target: /data, read_only: true}."""
    if isinstance(volume, str):
        parts = volume.split(":")
        return parts[1], parts[-1] == "ro"
    return volume.get("target"), volume.get("read_only") is True


def test_plain_compose_reserves_no_gpu_and_publishes_the_default_ports():
    services = compose_config("docker-compose.yml")
    assert {"mnist-data", "torch-worker", "keras-worker", "coordinator"} <= set(services)
    for name, port in (("torch-worker", 50051), ("keras-worker", 50052), ("jax-worker", 50053)):
        service = services[name]
        assert gpu_ids(service) == []
        published = service["ports"][0]
        assert "127.0.0.1" in str(published) and str(port) in str(published)
        assert service["depends_on"]["mnist-data"]["condition"] == "service_completed_successfully"
        assert sorted(read_only_mount(v) for v in service["volumes"]) == [("/data", True), ("/datasets", True)]  # MNIST, other sets
        assert "weightrelay.healthcheck" in service["healthcheck"]["test"]


@pytest.mark.parametrize("overlay", [(), ("docker-compose.gpu.yml",), ("docker-compose.secure.yml",)], ids=["plain", "gpu", "secure"])
def test_compose_publishes_each_data_channel_at_the_port_the_worker_offers(overlay):
    """A worker names its own data port to the clients that read weights there: published at that same port."""
    services = compose_config("docker-compose.yml", *overlay)
    for name, port in (("torch-worker", 50061), ("keras-worker", 50062), ("jax-worker", 50063)):
        command = services[name]["command"]
        assert command[command.index("--data-port") + 1] == str(port)
        [data] = [p for p in services[name]["ports"] if str(port) in str(p)]
        assert "127.0.0.1" in str(data) and str(data).count(str(port)) == 2


def test_gpu_override_reserves_one_gpu_per_worker():
    services = compose_config("docker-compose.yml", "docker-compose.gpu.yml")
    assert gpu_ids(services["torch-worker"]) == ["0"]
    assert gpu_ids(services["keras-worker"]) == ["1"]
    assert services["keras-worker"]["build"]["args"]["FRAMEWORK_REQUIREMENT"].startswith("tensorflow[and-cuda]")
    assert gpu_ids(services["jax-worker"]) == ["2"]
    assert services["jax-worker"]["build"]["args"]["FRAMEWORK_REQUIREMENT"].startswith("jax[cuda12]")


def render(directory: str) -> list[dict]:
    kubectl = require_tool(("kubectl",), "docker/get-kubectl.sh puts one in .tools/bin")
    out = subprocess.run([kubectl, "kustomize", str(REPO / directory)], capture_output=True, text=True, check=True)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.mark.parametrize("directory", ["deploy/k8s/base", "deploy/k8s/overlays/cpu"])
def test_kubernetes_manifests_validate_against_the_schemas(directory):
    documents = render(directory)
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in documents)
    assert kinds == [
        ("Deployment", "jax-worker"), ("Deployment", "keras-worker"), ("Deployment", "torch-worker"), ("Job", "coordinator"), ("Job", "mnist-fetch"),
        ("NetworkPolicy", "workers-accept-only-the-coordinator"), ("PersistentVolumeClaim", "weightrelay-mnist"), ("PersistentVolumeClaim", "weightrelay-runs"),
        ("Service", "jax-worker"), ("Service", "keras-worker"), ("Service", "torch-worker"),
    ]
    for document in documents:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(document, version, strict=True)


def workers(directory: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0] for d in render(directory) if d["kind"] == "Deployment"}


def test_each_worker_requests_one_gpu_and_has_grpc_probes():
    for name, container in workers("deploy/k8s/base").items():
        assert container["resources"]["requests"]["nvidia.com/gpu"] == 1, name
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1, name
        port = container["ports"][0]["containerPort"]
        assert container["readinessProbe"]["grpc"] == {"port": port, "service": "weightrelay.v1.Worker"}
        assert container["livenessProbe"]["grpc"]["port"] == port


def test_only_the_coordinator_reaches_the_workers_and_jobs_have_deadlines():
    documents = render("deploy/k8s/base")
    policy = next(d for d in documents if d["kind"] == "NetworkPolicy")
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in documents if d["kind"] in ("Deployment", "Job")}

    def selected(labels: dict) -> bool:
        return all(labels.get(e["key"]) in e["values"] for e in policy["spec"]["podSelector"]["matchExpressions"])

    assert {name for name, labels in pods.items() if selected(labels)} == {"torch-worker", "keras-worker", "jax-worker"}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    [rule] = policy["spec"]["ingress"]
    [source] = rule["from"]
    allowed = {name for name, labels in pods.items() if all(labels.get(k) == v for k, v in source["podSelector"]["matchLabels"].items())}
    assert allowed == {"coordinator"}
    assert sorted(p["port"] for p in rule["ports"]) == [50051, 50052, 50053, 50061, 50062, 50063]  # gRPC, data channels
    for job in (d for d in documents if d["kind"] == "Job"):
        assert job["spec"]["activeDeadlineSeconds"] > 0, job["metadata"]["name"]


def test_each_worker_serves_its_data_channel_where_the_coordinator_reaches_it():
    documents = render("deploy/k8s/base")
    [policy] = [d for d in documents if d["kind"] == "NetworkPolicy"]
    allowed = {p["port"] for p in policy["spec"]["ingress"][0]["ports"]}
    for name, container in workers("deploy/k8s/base").items():
        args = container["args"]
        port = int(args[args.index("--data-port") + 1])
        assert {"name": "data", "containerPort": port} in container["ports"], name
        [service] = [d for d in documents if d["kind"] == "Service" and d["metadata"]["name"] == name]
        assert {"name": "data", "port": port, "targetPort": "data"} in service["spec"]["ports"], name
        assert port in allowed, name


def test_cpu_overlay_requests_no_gpu():
    for name, container in workers("deploy/k8s/overlays/cpu").items():
        assert "nvidia.com/gpu" not in container["resources"].get("requests", {}), name
        assert "nvidia.com/gpu" not in container["resources"].get("limits", {}), name
        assert "--device=cpu" in container["args"]
        assert container["image"].endswith(":latest")


def test_secure_override_gives_the_workers_tls_a_token_and_tls_health_checks():
    services = compose_config("docker-compose.yml", "docker-compose.secure.yml")
    for name, port in (("torch-worker", 50051), ("keras-worker", 50052), ("jax-worker", 50053)):
        service = services[name]
        command = service["command"]
        assert command[command.index("--tls-cert") + 1] == "/run/secrets/server.crt"
        assert command[command.index("--tls-client-ca") + 1] == "/run/secrets/ca.crt"
        assert service["environment"]["WEIGHTRELAY_TOKEN_FILE"] == "/run/secrets/token"
        assert service["environment"]["WEIGHTRELAY_NO_DOWNLOAD"] == "1"  # the base file's settings stay
        assert f"127.0.0.1:{port}" in service["healthcheck"]["test"] and "--tls-ca" in service["healthcheck"]["test"]
        assert {s["source"] if isinstance(s, dict) else s for s in service["secrets"]} >= {"server.crt", "server.key", "ca.crt", "token"}
    assert services["coordinator"]["environment"]["WEIGHTRELAY_TOKEN_FILE"] == "/run/secrets/token"


def test_the_kuberay_cluster_has_a_head_without_actors_and_a_gpu_worker_group():
    [cluster] = render("deploy/k8s/ray")
    assert (cluster["apiVersion"], cluster["kind"], cluster["metadata"]["name"]) == ("ray.io/v1", "RayCluster", "weightrelay")
    pinned = next(line for line in (REPO / "constraints.txt").read_text().splitlines() if line.startswith("ray=="))
    assert cluster["spec"]["rayVersion"] == pinned.removeprefix("ray==")
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # the head runs the sweep's coordinators, no workers
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["requests"]["nvidia.com/gpu"] == 1 and gpu["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    claims = {d["metadata"]["name"] for d in render("deploy/k8s/base") if d["kind"] == "PersistentVolumeClaim"}
    for template in [head["template"], *(g["template"] for g in groups.values())]:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ray-node", **template["metadata"]}, "spec": template["spec"]}
        for version in K8S_VERSIONS:  # every pod template is a valid Pod
            kubernetes_validate.validate(pod, version, strict=True)
        assert {v["persistentVolumeClaim"]["claimName"] for v in template["spec"]["volumes"]} <= claims
        assert template["spec"]["containers"][0]["image"] == "weightrelay/ray-node:latest"
