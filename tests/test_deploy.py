"""The deployments, offline: the Kubernetes manifests against the API schemas that
kubernetes-validate ships (strict: an unknown field fails), and what schemas cannot see, for
them and for the Swarm stack (tests/swarm runs that one for real): names that must agree,
selectors that must select, the lab key's secret everywhere, health checks, the probe fleet's
shards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


def k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def pods(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(workload name, pod template) of every workload."""
    return [(d["metadata"]["name"], d["spec"]["template"]) for d in docs
            if d["kind"] in ("StatefulSet", "Deployment", "Job")]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_k8s_manifests_pass_the_api_schemas(version):
    docs = k8s_docs()
    assert {d["kind"] for d in docs} >= {"Service", "StatefulSet", "Job",
                                         "PersistentVolumeClaim"}
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} ({version}): {exc.message} "
                        f"at {'.'.join(str(p) for p in exc.path)}")


def test_a_broken_manifest_fails_the_schema_check():
    """The check can fail: a typo'd field and a wrong type are caught."""
    service = next(d for d in k8s_docs() if d["kind"] == "Service")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**service, "spec": {**service["spec"], "clusterIp": 1}},
                                     K8S_VERSIONS[-1], strict=True)


def test_the_k8s_names_selectors_and_secrets_agree():
    docs = k8s_docs()
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    workloads = pods(docs)
    for name, service in services.items():
        assert service["spec"]["clusterIP"] == "None", name  # the pod itself, no virtual IP
        selected = [w for w, pod in workloads
                    if service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()]
        assert selected == [name], (name, selected)  # a server's Service: that server alone
    for workload, pod in workloads:
        secrets = {v["secret"]["secretName"] for v in pod["spec"].get("volumes", [])
                   if "secret" in v}
        assert secrets == {"vphone-auth"}, workload
        for container in pod["spec"]["containers"]:
            env = env_of(container)
            assert env["VPHONE_AUTH_SECRET_FILE"] == "/run/secrets/vphone/key", workload
            for key in ("RELAY_PUBLIC_URL", "RELAY_PARENT", "ENDPOINT_SERVER", "PROBE_SERVERS"):
                if key in env:  # every name dialled is a Service of this deployment
                    host = env[key].split("://")[1].split(":")[0]
                    assert host in services, (workload, key, host)
            if "RELAY_NAME" in env:
                assert env["RELAY_PUBLIC_URL"] == \
                    f"http://{env['RELAY_NAME']}:{env['RELAY_PORT']}", workload
                for probe in ("readinessProbe", "livenessProbe"):
                    check = container[probe]["httpGet"]
                    assert check == {"path": "/healthz", "port": int(env["RELAY_PORT"])}
            assert container["resources"]["requests"], workload


@pytest.mark.parametrize("name", ["vphone-probe", "vphone-capacity"])
def test_the_k8s_probe_jobs_are_fleets_of_shards(name):
    job = next(d for d in k8s_docs() if d["kind"] == "Job" and d["metadata"]["name"] == name)
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"]
    container = spec["template"]["spec"]["containers"][0]
    assert int(env_of(container)["PROBE_SHARDS"]) == spec["completions"]
    assert "$JOB_COMPLETION_INDEX" in " ".join(container["args"])  # an output per shard


def test_the_k8s_capacity_fleet_finds_its_leader():
    """The followers' PROBE_LEADER is pod 0's own name (JOB-0.SUBDOMAIN), published by a
    headless Service even before the pod is ready, on the port the leader listens on."""
    docs = k8s_docs()
    job = next(d for d in docs if d["kind"] == "Job" and d["metadata"]["name"] ==
               "vphone-capacity")
    pod = job["spec"]["template"]
    env = env_of(pod["spec"]["containers"][0])
    host, port = env["PROBE_LEADER"].split("://")[1].split(":")
    assert host == f"{job['metadata']['name']}-0.{pod['spec']['subdomain']}"
    assert env["PROBE_FLEET_LISTEN"] == f"0.0.0.0:{port}"
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] ==
                   pod["spec"]["subdomain"])
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert [p["port"] for p in service["spec"]["ports"]] == [int(port)]
    assert "capacity" in " ".join(pod["spec"]["containers"][0]["args"])


def test_the_swarm_stack_reaches_everything_by_dnsrr_and_pins_sites():
    stack = yaml.safe_load((DEPLOY / "swarm" / "stack.yml").read_text())
    assert stack["version"] == "3.8"
    assert stack["secrets"]["vphone_auth"] == {"external": True}
    assert stack["networks"]["vphone"]["driver"] == "overlay"
    services = stack["services"]
    assert set(services) >= {"upper", "lower-a", "lower-b", "devices-a", "devices-b", "probe"}
    for name, service in services.items():
        # Swarm's virtual IPs carry no UDP (and IPVS is absent here): every service by DNS
        assert service["deploy"]["endpoint_mode"] == "dnsrr", name
        assert service["secrets"] == ["vphone_auth"], name
        assert service["environment"]["VPHONE_AUTH_SECRET_FILE"] == "/run/secrets/vphone_auth"
    for site in "ab":
        for name in (f"lower-{site}", f"devices-{site}"):
            assert services[name]["deploy"]["placement"]["constraints"] == \
                [f"node.labels.vphone.site-{site} == true"], name
    probe = services["probe"]["environment"]
    assert probe["PROBE_SHARD_SLOT"] == "{{.Task.Slot}}"
    assert probe["PROBE_OUT"] == "/results/shard-{{.Task.Slot}}"
    # the capacity fleet's followers find the leader by the service's own (dnsrr) name
    fleet = services["probe-capacity"]["environment"]
    assert fleet["PROBE_SHARD_SLOT"] == "{{.Task.Slot}}"
    port = fleet["PROBE_FLEET_LISTEN"].rsplit(":", 1)[1]
    assert fleet["PROBE_LEADER"] == f"http://probe-capacity:{port}"
