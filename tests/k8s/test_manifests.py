"""The KubeRay manifests in k8s/: rendered by ``kubectl kustomize`` (what ``kubectl apply -k``
applies), validated against KubeRay's own CRD schemas, and checked for what a schema cannot see.

- every RayCluster/RayJob of the base and of each overlay validates against the v1
  ``openAPIV3Schema`` of the CRDs in ``shared/kuberay-crds/`` (beside the repository), made
  strict the way ``kubectl apply`` (field validation ``Strict``) is: unknown fields fail;
- the RayJob's entrypoint names a script in this repository and only flags its parser accepts;
- resources, GPUs, secrets by reference only, non-root pods, no external exposure, the job's
  lifecycle, /dev/shm, autoscaling bounds, storage of the run directory, the Dockerfile;
- access: Ray's token authentication with the token from a Secret (head, workers, submitter),
  a NetworkPolicy that lets only the Ray pods, the submitter and the operator in (evaluated for
  probe callers: who reaches which port), S3 credentials only in the pods that use S3;
- each check is shown to fail on a deliberately broken copy, so a green run means something.

    python -m pytest tests/k8s -q
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.k8s.kustomize import KustomizeError, build, json6902

REPO = Path(__file__).resolve().parents[2]
CRDS = Path(__file__).resolve().parents[3] / "shared" / "kuberay-crds"
K8S = REPO / "k8s"
DOCKERFILE = REPO / "docker" / "Dockerfile"
TARGETS = ["base", "overlays/dev-cpu", "overlays/gpu-multinode"]
GPU_TARGETS = ["base", "overlays/gpu-multinode"]
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
ALLOWED_KINDS = {"RayCluster", "RayJob", "ConfigMap", "PersistentVolumeClaim", "NetworkPolicy"}
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
GPU = "nvidia.com/gpu"
TOKEN_SECRET, TOKEN_KEY = "vlmray-ray-token", "auth_token"  # KubeRay's key for authOptions
S3_SECRET = "vlmray-s3"
DASHBOARD_PORT = 8265


# --- rendering ----------------------------------------------------------------------------


@functools.cache
def _rendered(target: str) -> tuple[dict[str, Any], ...]:
    command = _kustomize_command()
    if command is None:  # no kubectl/kustomize here: the Python renderer, checked against them
        return tuple(build(K8S / target))
    out = subprocess.run([*command, str(K8S / target)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, f"{' '.join(command)} k8s/{target} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def render(target: str) -> list[dict[str, Any]]:
    """The documents ``kubectl kustomize k8s/<target>`` gives (a fresh copy each call)."""
    return copy.deepcopy(list(_rendered(target)))


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def _kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


# --- CRD schemas --------------------------------------------------------------------------


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema as ``kubectl apply`` enforces it: an object that lists its properties rejects
    any other (the API server's strict field validation), unless it preserves unknown fields.
    ``x-kubernetes-*`` keys (CEL rules, list types, int-or-string) are left for jsonschema to
    ignore; int-or-string fields already carry ``anyOf: [integer, string]``."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: _strict(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _strict(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [_strict(s) for s in out[key]]
    return out


@functools.cache
def validator(kind: str) -> jsonschema.protocols.Validator:
    path = CRDS / CRD_FILES[kind]
    if not path.is_file():
        raise FileNotFoundError(
            f"KubeRay CRD {path} is missing: the tests expect shared/kuberay-crds/ beside the "
            "repository (CI copies shared/ there)")
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert version["storage"], f"{path}: v1 is not the storage version"
    schema = _strict(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_errors(doc: dict[str, Any]) -> list[str]:
    errors = validator(doc["kind"]).iter_errors(doc)
    return sorted(f"{doc['kind']}/{doc['metadata'].get('name')}: "
                  f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


# --- walking pods and containers ----------------------------------------------------------


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def groups(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, group) for the head (``"head"``) and each worker group of a cluster spec."""
    spec = cluster_spec(doc)
    yield "head", spec["headGroupSpec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod spec) for every pod a RayCluster or RayJob will create."""
    for doc in docs:
        if doc["kind"] not in ("RayCluster", "RayJob"):
            continue
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        for group_name, group in groups(doc):
            yield f"{name} {group_name}", group["template"]["spec"]
        if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
            yield f"{name} submitter", doc["spec"]["submitterPodTemplate"]["spec"]


def containers(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, container, pod spec) for every container, the autoscaler sidecar included (its
    resources and securityContext come from ``autoscalerOptions``)."""
    for where, pod in pod_specs(docs):
        for c in pod.get("initContainers", []) + pod.get("containers", []):
            yield f"{where} {c['name']}", c, pod
    for doc in docs:
        if doc["kind"] in ("RayCluster", "RayJob") and cluster_spec(doc).get("enableInTreeAutoscaling"):
            options = cluster_spec(doc).get("autoscalerOptions", {})
            head_pod = cluster_spec(doc)["headGroupSpec"]["template"]["spec"]
            sidecar = {"name": "autoscaler", "resources": options.get("resources", {}),
                       "securityContext": options.get("securityContext", {}),
                       "env": options.get("env", []), "envFrom": options.get("envFrom", [])}
            yield f"{doc['kind']}/{doc['metadata']['name']} autoscaler", sidecar, head_pod


def pod_templates(docs: list[dict[str, Any]]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(where, role, pod template) with role ``"ray"`` for a head or worker pod of a RayCluster
    or a RayJob's cluster, ``"submitter"`` for the RayJob's submitter pod."""
    for doc in docs:
        if doc["kind"] not in ("RayCluster", "RayJob"):
            continue
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        for group_name, group in groups(doc):
            yield f"{name} {group_name}", "ray", group["template"]
        if doc["kind"] == "RayJob":
            yield f"{name} submitter", "submitter", doc["spec"]["submitterPodTemplate"]


def walk(node: Any) -> Iterator[tuple[Any, Any]]:
    """(key, value) of every mapping entry, at any depth."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9,
          "T": 1e12, "m": 1e-3, "": 1}


def quantity(value: Any) -> float:
    """A Kubernetes quantity ("500m", "4Gi", 8) as a number."""
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match and match.group(2) in _UNITS, f"not a quantity: {value!r}"
    return float(match.group(1)) * _UNITS[match.group(2)]


# --- the checks a schema cannot make (each returns a list of problems) ----------------------


def resource_problems(docs: list[dict[str, Any]]) -> list[str]:
    out = []
    for where, c, _ in containers(docs):
        res = c.get("resources", {})
        for part in ("requests", "limits"):
            for name in ("cpu", "memory"):
                if name not in res.get(part, {}):
                    out.append(f"{where}: no {part}.{name}")
        gpu_req, gpu_lim = res.get("requests", {}).get(GPU), res.get("limits", {}).get(GPU)
        if (gpu_req is None) != (gpu_lim is None) or (gpu_req is not None and
                                                       quantity(gpu_req) != quantity(gpu_lim)):
            out.append(f"{where}: {GPU} must be requested and limited alike ({gpu_req}/{gpu_lim})")
    for doc in docs:
        if doc["kind"] in ("RayCluster", "RayJob"):
            head = cluster_spec(doc)["headGroupSpec"]
            if head.get("rayStartParams", {}).get("num-gpus") != "0":
                out.append(f"{doc['kind']}: the head must start with num-gpus '0'")
            for c in head["template"]["spec"]["containers"]:
                if any(GPU in part for part in c.get("resources", {}).values()):
                    out.append(f"{doc['kind']}: the head container asks for GPUs")
    return out


def secret_problems(docs: list[dict[str, Any]]) -> list[str]:
    out = []
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata'].get('name')}"
        if doc["kind"] == "Secret" and (doc.get("data") or doc.get("stringData")):
            out.append(f"{name}: a Secret with data is shipped")
        if doc["kind"] == "ConfigMap":
            out += [f"{name}: secret-looking key {k} in a ConfigMap"
                    for k in doc.get("data", {}) if SECRET_NAME.search(k)]
        for key, value in walk(doc):
            if key == "env" and isinstance(value, list):
                out += [f"{name}: env {e['name']} has a literal value" for e in value
                        if SECRET_NAME.search(e.get("name", "")) and "value" in e]
    return out


def security_problems(docs: list[dict[str, Any]]) -> list[str]:
    out = []
    for where, c, pod in containers(docs):
        pod_sc, sc = pod.get("securityContext", {}), c.get("securityContext", {})
        non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        user = sc.get("runAsUser", pod_sc.get("runAsUser"))
        if non_root is not True:
            out.append(f"{where}: runAsNonRoot is not true")
        if not isinstance(user, int) or user == 0:
            out.append(f"{where}: runAsUser {user!r} is not a non-root uid")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{where}: allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            out.append(f"{where}: privileged")
    return out


def exposure_problems(docs: list[dict[str, Any]]) -> list[str]:
    out = []
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata'].get('name')}"
        if doc["kind"] in ("Ingress", "Route", "Gateway", "HTTPRoute"):
            out.append(f"{name}: exposes the cluster")
        if doc["kind"] == "Service" and doc.get("spec", {}).get("type") in ("LoadBalancer", "NodePort"):
            out.append(f"{name}: Service of type {doc['spec']['type']}")
        if doc["kind"] in ("RayCluster", "RayJob"):
            head = cluster_spec(doc)["headGroupSpec"]
            service_type = head.get("headService", {}).get("spec", {}).get("type", "ClusterIP")
            if head.get("serviceType", "ClusterIP") != "ClusterIP" or service_type != "ClusterIP":
                out.append(f"{name}: head service is not ClusterIP")
            if head.get("enableIngress"):
                out.append(f"{name}: head ingress enabled")
    return out


def entrypoint_problems(entrypoint: str) -> list[str]:
    """The entrypoint runs a script of this repository with only flags its parser knows, and
    the flags build a config (recipe exists, values have the fields' types)."""
    from vlmray.cli import build_parser, parse_config

    argv = shlex.split(entrypoint)
    if len(argv) < 2 or argv[0] not in ("python", "python3"):
        return [f"entrypoint does not start with `python <script>`: {entrypoint!r}"]
    script, flags = REPO / argv[1], argv[2:]
    if not script.is_file():
        return [f"entrypoint script {argv[1]} is not in the repository"]
    if script.resolve() != (REPO / "jobs" / "pretrain.py").resolve():
        return [f"entrypoint script {argv[1]} is not jobs/pretrain.py, whose flags are checked"]
    _, unknown = build_parser("").parse_known_args(flags)
    if unknown:
        return [f"flags jobs/pretrain.py does not accept: {unknown}"]
    try:
        parse_config(flags, "")
    except SystemExit as e:
        return [f"flags do not make a config (exit {e.code}): {flags}"]
    return []


def build_parser_args(entrypoint: str) -> Any:
    """The entrypoint's flags as jobs/pretrain.py's parser reads them (``args.output``...)."""
    from vlmray.cli import build_parser

    args, _ = build_parser("").parse_known_args(shlex.split(entrypoint)[2:])
    return args


def shm_problems(docs: list[dict[str, Any]]) -> list[str]:
    out = []
    for doc in docs:
        if doc["kind"] not in ("RayCluster", "RayJob"):
            continue
        for group_name, group in groups(doc):
            pod = group["template"]["spec"]
            ray = pod["containers"][0]
            mounts = {m["mountPath"]: m["name"] for m in ray.get("volumeMounts", [])}
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            shm = volumes.get(mounts.get("/dev/shm", ""), {}).get("emptyDir")
            where = f"{doc['kind']} {group_name}"
            if not shm or shm.get("medium") != "Memory" or "sizeLimit" not in shm:
                out.append(f"{where}: no memory-backed emptyDir with a sizeLimit at /dev/shm")
            elif quantity(shm["sizeLimit"]) > quantity(ray["resources"]["limits"]["memory"]):
                out.append(f"{where}: /dev/shm is larger than the memory limit")
    return out


# --- access: Ray's token, the NetworkPolicy, S3 credentials ---------------------------------


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def auth_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Ray's token authentication is on for every pod: ``authOptions`` names the token Secret
    (the operator then gives the token to the autoscaler and its own init containers, and uses
    it for the job API), and each Ray container and the submitter take RAY_AUTH_MODE=token and
    RAY_AUTH_TOKEN from that Secret (required, so a missing Secret stops the pod)."""
    out = []
    for doc in docs:
        if doc["kind"] in ("RayCluster", "RayJob"):
            options = cluster_spec(doc).get("authOptions", {})
            if (options.get("mode"), options.get("secretName")) != ("token", TOKEN_SECRET):
                out.append(f"{doc['kind']}: authOptions is not {{mode: token, secretName: "
                           f"{TOKEN_SECRET}}}: {options}")
    for where, _, template in pod_templates(docs):
        env = _env(template["spec"]["containers"][0])
        if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
            out.append(f"{where}: RAY_AUTH_MODE is not token")
        ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
        if (ref.get("name"), ref.get("key")) != (TOKEN_SECRET, TOKEN_KEY) or ref.get("optional"):
            out.append(f"{where}: RAY_AUTH_TOKEN is not the required key {TOKEN_KEY} of the "
                       f"Secret {TOKEN_SECRET}")
    for where, c, _ in containers(docs):
        names = [e["name"] for e in c.get("env", [])]
        if len(names) != len(set(names)):
            out.append(f"{where}: an env variable is set twice (the last one wins)")
        mode = _env(c).get("RAY_AUTH_MODE")
        if mode is not None and mode.get("value") != "token":
            out.append(f"{where}: RAY_AUTH_MODE={mode.get('value')!r}")
    return out


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against a pod's labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _port_admitted(rule: dict[str, Any], port: int, container: dict[str, Any]) -> bool:
    if not rule.get("ports"):
        return True
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    for entry in rule["ports"]:
        if entry.get("protocol", "TCP") != "TCP":
            continue
        want = entry.get("port")
        want = named.get(want, -1) if isinstance(want, str) else want
        if want is None or want <= port <= entry.get("endPort", want):
            return True
    return False


def _peer_admitted(rule: dict[str, Any], policy_ns: str, caller: dict[str, Any]) -> bool:
    peers = rule.get("from")
    if not peers:
        return True  # no `from`: every source
    for peer in peers:
        if "ipBlock" in peer:
            return True  # admits addresses, whatever the pod: counted as open to everyone
        if caller["labels"] is None:
            continue     # a caller outside the cluster matches no pod or namespace selector
        if "namespaceSelector" in peer:
            ns_ok = _selects(peer["namespaceSelector"],
                             {"kubernetes.io/metadata.name": caller["namespace"]})
        else:
            ns_ok = caller["namespace"] == policy_ns
        if ns_ok and _selects(peer.get("podSelector", {}), caller["labels"]):
            return True
    return False


def admitted_ports(docs: list[dict[str, Any]], namespace: str, template: dict[str, Any],
                   caller: dict[str, Any], ports: tuple[int, ...]) -> set[int]:
    """The ``ports`` of a pod made from ``template`` in ``namespace`` that ``caller``
    ({"namespace", "labels"}; labels None: outside the cluster) may connect to under the
    NetworkPolicies in ``docs`` (Kubernetes semantics: a pod no Ingress policy selects admits
    everything; otherwise the union of the selecting policies' rules)."""
    labels = template.get("metadata", {}).get("labels", {})
    container = template["spec"]["containers"][0]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"
                and d["metadata"].get("namespace", "default") == namespace
                and "Ingress" in d["spec"].get("policyTypes", ["Ingress"])
                and _selects(d["spec"].get("podSelector", {}), labels)]
    if not policies:
        return set(ports)
    return {port for port in ports for policy in policies
            for rule in policy["spec"].get("ingress", [])
            if _port_admitted(rule, port, container) and _peer_admitted(rule, namespace, caller)}


RAY_PORTS = (6379, DASHBOARD_PORT, 10001, 8080, 52365, 20000)  # GCS, job API, client, metrics,
# dashboard agent, a worker's port


def network_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Every Ray pod admits the other Ray pods of its namespace on every port, the RayJob's
    submitter and the KubeRay operator on the dashboard port only, and nobody else: no other
    pod of the namespace, no pod of another namespace (even one labelled like ours), nothing
    outside the cluster."""
    templates = list(pod_templates(docs))
    (submitter,) = [t for _, role, t in templates if role == "submitter"]
    sub_labels = submitter.get("metadata", {}).get("labels", {})
    out = []
    for where, role, template in templates:
        if role != "ray":
            continue
        ns = next(d["metadata"].get("namespace", "default") for d in docs
                  if where.startswith(f"{d['kind']}/{d['metadata']['name']} "))
        ray_labels = template.get("metadata", {}).get("labels", {})
        expected = [
            ("a Ray pod of this namespace", {"namespace": ns, "labels": ray_labels}, RAY_PORTS),
            ("the RayJob's submitter", {"namespace": ns, "labels": sub_labels}, (DASHBOARD_PORT,)),
            ("the KubeRay operator", {"namespace": "kuberay-system", "labels": {
                "app.kubernetes.io/name": "kuberay-operator",
                "app.kubernetes.io/component": "kuberay-operator"}}, (DASHBOARD_PORT,)),
            ("another pod of this namespace", {"namespace": ns, "labels": {"app": "notebook"}}, ()),
            ("a pod of another namespace labelled like a Ray pod",
             {"namespace": "intruder", "labels": ray_labels}, ()),
            ("a pod of another namespace labelled like the submitter",
             {"namespace": "intruder", "labels": sub_labels}, ()),
            ("an address outside the cluster", {"namespace": None, "labels": None}, ()),
        ]
        for who, caller, want in expected:
            got = admitted_ports(docs, ns, template, caller, RAY_PORTS)
            if got != set(want):
                out.append(f"{where}: {who} reaches ports {sorted(got)}, expected {sorted(want)}")
    return out


def _uses_s3(docs: list[dict[str, Any]]) -> bool:
    """Whether the target's run reads or writes s3:// (its RayJob's --data.source, --output)."""
    args = build_parser_args(one(docs, "RayJob")["spec"]["entrypoint"])
    return any(str(v).startswith("s3://") for v in (args.output, getattr(args, "data.source")))


def s3_problems(docs: list[dict[str, Any]]) -> list[str]:
    """The S3 credentials (Secret vlmray-s3) go only where they are used: through ``envFrom``
    into the Ray container of each head and worker pod (driver, Ray Train workers, Ray Data
    tasks) when the run uses S3; never into the submitter, the autoscaler, a volume, or an
    ``env`` entry (KubeRay copies ``env`` into its wait-gcs-ready init container)."""
    uses_s3 = _uses_s3(docs)
    ray_containers = {id(t["spec"]["containers"][0]) for _, role, t in pod_templates(docs)
                      if role == "ray"}
    out = []
    for where, c, _ in containers(docs):
        in_env = [e["name"] for e in c.get("env", [])
                  if e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == S3_SECRET]
        in_env_from = any(src.get("secretRef", {}).get("name") == S3_SECRET
                          for src in c.get("envFrom", []))
        if in_env:
            out.append(f"{where}: S3 credentials in env {in_env} (use envFrom)")
        if in_env_from and not (uses_s3 and id(c) in ray_containers):
            out.append(f"{where}: has the S3 credentials and does not use S3")
        if uses_s3 and id(c) in ray_containers and not in_env_from:
            out.append(f"{where}: a Ray container of a run on S3 without the S3 credentials")
    out += [f"Secret {S3_SECRET} mounted as a volume" for key, value in walk(docs)
            if key == "secret" and isinstance(value, dict) and value.get("secretName") == S3_SECRET]
    return out


# --- rendering and the schema ---------------------------------------------------------------


def test_crds_are_beside_the_repository() -> None:
    for name in CRD_FILES.values():
        assert (CRDS / name).is_file(), (
            f"{CRDS / name} is missing: shared/kuberay-crds/ must sit beside the repository")


@pytest.mark.parametrize("target", TARGETS)
def test_renders_the_expected_objects(target: str) -> None:
    docs = render(target)
    kinds = sorted(d["kind"] for d in docs)
    expected = ["ConfigMap", "NetworkPolicy", "RayCluster", "RayJob"]
    if target == "overlays/dev-cpu":
        expected = sorted(expected + ["PersistentVolumeClaim"])
    assert kinds == expected
    assert {d["kind"] for d in docs} <= ALLOWED_KINDS
    for doc in docs:
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "vlmray"
        # KubeRay derives service and pod names from these: DNS-1035 labels, with room to spare
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
        assert len(doc["metadata"]["name"]) <= 40
    if target.startswith("overlays/"):
        assert {d["metadata"].get("namespace") for d in docs} == {
            {"overlays/dev-cpu": "vlmray-dev", "overlays/gpu-multinode": "vlmray"}[target]}


@pytest.mark.parametrize("target", TARGETS)
def test_renderer_matches_kustomize(target: str) -> None:
    """The Python renderer (the fallback where kubectl is missing) agrees with kustomize."""
    command = _kustomize_command()
    if command is None:
        pytest.skip("neither kustomize nor kubectl is installed; the Python renderer stands alone")
    out = subprocess.run([*command, str(K8S / target)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    real = [d for d in yaml.safe_load_all(out.stdout) if d]

    def key(d: dict[str, Any]) -> tuple[str, str]:
        return d["kind"], d["metadata"]["name"]

    assert sorted(real, key=key) == sorted(build(K8S / target), key=key)


@pytest.mark.parametrize("target", TARGETS)
def test_ray_objects_validate_against_the_kuberay_crds(target: str) -> None:
    docs = [d for d in render(target) if d["kind"] in CRD_FILES]
    assert {d["kind"] for d in docs} == {"RayCluster", "RayJob"}
    for doc in docs:
        assert doc["apiVersion"] == "ray.io/v1"
        assert schema_errors(doc) == []


def _set(path: str, value: Any) -> list[dict[str, Any]]:
    return [{"op": "add", "path": path, "value": value}]


BROKEN = {
    "replicas is a string": ("RayCluster", _set("/spec/workerGroupSpecs/0/replicas", "two"),
                             "workerGroupSpecs.0.replicas"),
    "unknown worker-group field": ("RayCluster", _set("/spec/workerGroupSpecs/0/gpus", 8),
                                   "Additional properties"),
    "missing groupName": ("RayCluster", [{"op": "remove", "path": "/spec/workerGroupSpecs/0/groupName"}],
                          "'groupName' is a required property"),
    "rayStartParams value not a string": (
        "RayCluster", _set("/spec/headGroupSpec/rayStartParams/num-gpus", 0), "rayStartParams"),
    "bad resource quantity": (
        "RayCluster",
        _set("/spec/workerGroupSpecs/0/template/spec/containers/0/resources/limits/memory", "lots"),
        "limits.memory"),
    "container without a name": (
        "RayCluster", [{"op": "remove", "path": "/spec/headGroupSpec/template/spec/containers/0/name"}],
        "'name' is a required property"),
    "shutdown flag not a boolean": ("RayJob", _set("/spec/shutdownAfterJobFinishes", "yes"),
                                    "shutdownAfterJobFinishes"),
    "misspelt RayJob field": ("RayJob", _set("/spec/ttlSecondsAfterFinish", 60), "Additional properties"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_schema_rejects_a_broken_manifest(case: str) -> None:
    kind, ops, expected = BROKEN[case]
    doc = one(render("base"), kind)
    assert schema_errors(doc) == []
    errors = schema_errors(json6902(doc, ops))
    assert errors, f"{case}: the broken manifest validated"
    assert any(expected in e for e in errors), errors


def test_renderer_fails_loudly_on_a_stale_patch(tmp_path: Path) -> None:
    """A JSON6902 ``test`` that no longer matches the base stops the build."""
    doc = one(render("base"), "RayCluster")
    with pytest.raises(KustomizeError, match="test failed"):
        json6902(doc, [{"op": "test", "path": "/spec/workerGroupSpecs/0/groupName", "value": "cpu"}])
    (tmp_path / "kustomization.yaml").write_text("resources: [x.yaml]\nimages: []\n")
    with pytest.raises(KustomizeError, match="does not implement"):
        build(tmp_path)


# --- the entrypoint -------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_entrypoint_runs_pretrain_with_accepted_flags(target: str) -> None:
    job = one(render(target), "RayJob")
    assert entrypoint_problems(job["spec"]["entrypoint"]) == []


@pytest.mark.parametrize("entrypoint, problem", [
    ("python jobs/pretrain.py --recipe clip_tiny --train.stepz 5", "does not accept"),
    ("python jobs/pretrain.py --train.steps many", "do not make a config"),
    ("python jobs/pretrain.py --recipe clip_huge", "do not make a config"),
    ("python jobs/train.py --recipe clip_tiny", "not in the repository"),
    ("ray job submit -- python jobs/pretrain.py", "does not start with"),
])
def test_entrypoint_check_catches_mistakes(entrypoint: str, problem: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    problems = entrypoint_problems(entrypoint)
    capsys.readouterr()  # argparse's own message on stderr
    assert problems and problem in problems[0], problems


# --- what every overlay must hold -----------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_every_container_has_cpu_and_memory_requests_and_limits(target: str) -> None:
    assert resource_problems(render(target)) == []


@pytest.mark.parametrize("target", GPU_TARGETS)
def test_gpu_group_requests_and_limits_gpus(target: str) -> None:
    cluster = one(render(target), "RayCluster")
    gpu_groups = {name: g for name, g in groups(cluster)
                  if GPU in g["template"]["spec"]["containers"][0]["resources"]["limits"]}
    assert set(gpu_groups) == {"gpu", "vllm"}
    for name, group in gpu_groups.items():
        pod = group["template"]["spec"]
        res = pod["containers"][0]["resources"]
        assert quantity(res["requests"][GPU]) == quantity(res["limits"][GPU]) >= 1
        assert any(t.get("key") == GPU for t in pod.get("tolerations", [])), name


def test_dev_cpu_has_no_gpus_and_small_requests() -> None:
    docs = render("overlays/dev-cpu")
    assert GPU not in json.dumps(docs)
    cluster = one(docs, "RayCluster")
    assert [name for name, _ in groups(cluster)] == ["head", "cpu"]
    for where, c, _ in containers(docs):
        requests = c["resources"]["requests"]
        assert quantity(requests["cpu"]) <= 2 and quantity(requests["memory"]) <= 4 * 2**30, where


@pytest.mark.parametrize("target", TARGETS)
def test_secrets_only_by_reference(target: str) -> None:
    docs = render(target)
    assert secret_problems(docs) == []
    refs = {v["name"] for k, v in walk(docs) if k in ("secretRef", "secretKeyRef")}
    assert refs <= {S3_SECRET, TOKEN_SECRET}
    for where, c, _ in containers(docs):
        if c["name"].startswith("ray-") and c["name"] != "ray-job-submitter":
            configs = [src["configMapRef"]["name"] for src in c.get("envFrom", [])
                       if "configMapRef" in src]
            assert configs == ["vlmray-s3-config"], where


@pytest.mark.parametrize("target", TARGETS)
def test_ray_requires_its_token(target: str) -> None:
    assert auth_problems(render(target)) == []


@pytest.mark.parametrize("target", TARGETS)
def test_only_ray_pods_the_submitter_and_the_operator_reach_ray_pods(target: str) -> None:
    docs = render(target)
    assert network_problems(docs) == []
    namespaces = [d["metadata"].get("namespace") for d in docs if d["kind"] == "NetworkPolicy"]
    assert namespaces == [one(docs, "RayCluster")["metadata"].get("namespace")]


@pytest.mark.parametrize("target", TARGETS)
def test_s3_credentials_only_in_the_pods_that_use_s3(target: str) -> None:
    docs = render(target)
    assert _uses_s3(docs) == (target != "overlays/dev-cpu")
    assert s3_problems(docs) == []
    holders = {where for where, c, _ in containers(docs)
               if any(src.get("secretRef", {}).get("name") == S3_SECRET
                      for src in c.get("envFrom", []))}
    if target == "overlays/dev-cpu":
        assert holders == set()
    else:  # the Ray container of every head and worker group; no submitter, no autoscaler
        assert holders and all(w.endswith((" ray-head", " ray-worker")) for w in holders), holders


@pytest.mark.parametrize("target", TARGETS)
def test_every_pod_runs_as_non_root(target: str) -> None:
    assert security_problems(render(target)) == []


@pytest.mark.parametrize("target", TARGETS)
def test_nothing_is_exposed_outside_the_cluster(target: str) -> None:
    assert exposure_problems(render(target)) == []


BREAKAGES = {
    "inline secret": (secret_problems, lambda docs: one(docs, "RayCluster")["spec"]["headGroupSpec"]
                      ["template"]["spec"]["containers"][0].setdefault("env", []).append(
                          {"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter2"})),
    "shipped Secret": (secret_problems, lambda docs: docs.append(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "vlmray-s3"},
         "stringData": {"AWS_ACCESS_KEY_ID": "x"}})),
    "root container": (security_problems, lambda docs: one(docs, "RayCluster")["spec"]
                       ["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
                       ["securityContext"].update(runAsUser=0)),
    "escalation allowed": (security_problems, lambda docs: one(docs, "RayJob")["spec"]
                           ["submitterPodTemplate"]["spec"]["containers"][0]["securityContext"]
                           .pop("allowPrivilegeEscalation")),
    "root autoscaler": (security_problems, lambda docs: one(docs, "RayCluster")["spec"]
                        ["autoscalerOptions"].pop("securityContext")),
    "LoadBalancer head": (exposure_problems, lambda docs: one(docs, "RayJob")["spec"]
                          ["rayClusterSpec"]["headGroupSpec"].update(serviceType="LoadBalancer")),
    "NodePort Service": (exposure_problems, lambda docs: docs.append(
        {"kind": "Service", "metadata": {"name": "dash"}, "spec": {"type": "NodePort"}})),
    "Ingress": (exposure_problems, lambda docs: docs.append(
        {"kind": "Ingress", "metadata": {"name": "dash"}, "spec": {}})),
    "no memory limit": (resource_problems, lambda docs: one(docs, "RayCluster")["spec"]
                        ["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resources"]
                        ["limits"].pop("memory")),
    "GPU requested, not limited": (resource_problems, lambda docs: one(docs, "RayCluster")["spec"]
                                   ["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
                                   ["resources"]["limits"].pop(GPU)),
    "GPUs on the head": (resource_problems, lambda docs: one(docs, "RayCluster")["spec"]
                         ["headGroupSpec"]["rayStartParams"].pop("num-gpus")),
    "disk-backed shm": (shm_problems, lambda docs: one(docs, "RayCluster")["spec"]
                        ["workerGroupSpecs"][0]["template"]["spec"]["volumes"][0]["emptyDir"]
                        .pop("medium")),
    "no authOptions": (auth_problems, lambda docs: one(docs, "RayJob")["spec"]["rayClusterSpec"]
                       .pop("authOptions")),
    "auth off in a worker": (auth_problems, lambda docs: _ray_env(docs, 1)[0].update(
        value="disabled")),
    "token as a literal": (auth_problems, lambda docs: _ray_env(docs, 2).__setitem__(
        1, {"name": "RAY_AUTH_TOKEN", "value": "hunter2"})),
    "token Secret optional": (auth_problems, lambda docs: _ray_env(docs, None)[1]["valueFrom"]
                              ["secretKeyRef"].update(optional=True)),
    "submitter without the token": (auth_problems, lambda docs: _submitter(docs).pop("env")),
    "auth turned off a second time": (auth_problems, lambda docs: _ray_env(docs, 0).append(
        {"name": "RAY_AUTH_MODE", "value": "disabled"})),
    "no NetworkPolicy": (network_problems, lambda docs: docs.remove(one(docs, "NetworkPolicy"))),
    "policy admits every pod": (network_problems, lambda docs: _ingress(docs).append({})),
    "Ray peers from any namespace": (network_problems, lambda docs: _ingress(docs)[0]["from"][0]
                                     .update(namespaceSelector={})),
    "submitter on every port": (network_problems, lambda docs: _ingress(docs)[1].pop("ports")),
    "operator on every port": (network_problems, lambda docs: _ingress(docs)[2].pop("ports")),
    "an ipBlock": (network_problems, lambda docs: _ingress(docs)[1]["from"].append(
        {"ipBlock": {"cidr": "10.0.0.0/8"}})),
    "a group the policy misses": (network_problems, lambda docs: one(docs, "RayJob")["spec"]
                                  ["rayClusterSpec"]["workerGroupSpecs"][2]["template"]
                                  .pop("metadata")),
    "S3 credentials on the submitter": (s3_problems, lambda docs: _submitter(docs).setdefault(
        "envFrom", []).append({"secretRef": {"name": S3_SECRET}})),
    "S3 credentials on the autoscaler": (s3_problems, lambda docs: one(docs, "RayCluster")["spec"]
                                         ["autoscalerOptions"].update(
                                             envFrom=[{"secretRef": {"name": S3_SECRET}}])),
    "S3 credentials in env": (s3_problems, lambda docs: _ray_env(docs, 0).append(
        {"name": "AWS_SECRET_ACCESS_KEY",
         "valueFrom": {"secretKeyRef": {"name": S3_SECRET, "key": "secret"}}})),
    "S3 credentials missing on a worker": (s3_problems, lambda docs: one(docs, "RayCluster")
                                           ["spec"]["workerGroupSpecs"][0]["template"]["spec"]
                                           ["containers"][0]["envFrom"].pop()),
}


def _ray_env(docs: list[dict[str, Any]], worker: int | None) -> list[dict[str, Any]]:
    """The env list of the RayCluster's head (``None``) or of worker group ``worker``."""
    spec = one(docs, "RayCluster")["spec"]
    group = spec["headGroupSpec"] if worker is None else spec["workerGroupSpecs"][worker]
    return group["template"]["spec"]["containers"][0]["env"]


def _submitter(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "RayJob")["spec"]["submitterPodTemplate"]["spec"]["containers"][0]


def _ingress(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return one(docs, "NetworkPolicy")["spec"]["ingress"]


@pytest.mark.parametrize("case", sorted(BREAKAGES))
def test_policy_checks_catch_a_broken_copy(case: str) -> None:
    check, breakage = BREAKAGES[case]
    docs = render("base")
    assert check(docs) == []
    breakage(docs)
    assert check(docs), f"{case}: {check.__name__} found nothing"


@pytest.mark.parametrize("target", TARGETS)
def test_rayjob_cleans_up_after_itself(target: str) -> None:
    job = one(render(target), "RayJob")["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    assert isinstance(job["ttlSecondsAfterFinished"], int) and job["ttlSecondsAfterFinished"] > 0
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict)
    workdir = re.findall(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), re.MULTILINE)[-1]
    assert runtime_env["working_dir"] == workdir  # the repository inside the image


@pytest.mark.parametrize("target", TARGETS)
def test_rayjob_cluster_is_the_rayclusters_shape(target: str) -> None:
    docs = render(target)
    assert one(docs, "RayJob")["spec"]["rayClusterSpec"] == one(docs, "RayCluster")["spec"]


@pytest.mark.parametrize("target", TARGETS)
def test_autoscaling_bounds_and_shm(target: str) -> None:
    docs = render(target)
    for doc in (one(docs, "RayCluster"), one(docs, "RayJob")):
        assert cluster_spec(doc)["enableInTreeAutoscaling"] is True
        for name, group in groups(doc):
            if name != "head":
                assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
    assert shm_problems(docs) == []


@pytest.mark.parametrize("target", GPU_TARGETS)
def test_vllm_group_has_its_image_and_custom_resource(target: str) -> None:
    cluster = one(render(target), "RayCluster")
    by_name = dict(groups(cluster))
    resources = json.loads(json.loads(by_name["vllm"]["rayStartParams"]["resources"]))
    assert resources["vllm"] >= 1
    image = by_name["vllm"]["template"]["spec"]["containers"][0]["image"]
    assert image.split(":")[0] != by_name["gpu"]["template"]["spec"]["containers"][0]["image"].split(":")[0]
    for name, group in by_name.items():
        if name != "vllm":
            assert "vllm" not in group.get("rayStartParams", {}).get("resources", ""), name


@pytest.mark.parametrize("target", TARGETS)
def test_run_directory_is_s3_or_a_mounted_volume(target: str) -> None:
    docs = render(target)
    job = one(docs, "RayJob")
    output = build_parser_args(job["spec"]["entrypoint"]).output
    assert output, "the RayJob must name --output (the cluster is deleted after the job)"
    if output.startswith("s3://"):
        return
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for name, group in groups(job):
        pod = group["template"]["spec"]
        pvcs = {v["name"] for v in pod.get("volumes", [])
                if v.get("persistentVolumeClaim", {}).get("claimName") in claims}
        mounts = [m["mountPath"] for m in pod["containers"][0].get("volumeMounts", [])
                  if m["name"] in pvcs]
        assert any(output.startswith(m.rstrip("/") + "/") for m in mounts), (
            f"{name}: {output} is not on a shared PersistentVolumeClaim")


def test_overlay_specifics() -> None:
    dev = build_parser_args(one(render("overlays/dev-cpu"), "RayJob")["spec"]["entrypoint"])
    assert (dev.recipe, getattr(dev, "data.source")) == ("clip_tiny", "builtin")

    base = one(render("base"), "RayJob")
    base_args = build_parser_args(base["spec"]["entrypoint"])
    assert base_args.recipe == "clip_vit_b16"
    assert getattr(base_args, "data.source").startswith("s3://") and base_args.output.startswith("s3://")

    docs = render("overlays/gpu-multinode")
    job = one(docs, "RayJob")
    args = build_parser_args(job["spec"]["entrypoint"])
    assert getattr(args, "train.max_failures") == "3"
    gpu = dict(groups(job))["gpu"]
    gpus = int(quantity(gpu["template"]["spec"]["containers"][0]["resources"]["limits"][GPU]))
    assert gpu["replicas"] == gpu["minReplicas"] >= 2 and gpus == 8
    assert int(getattr(args, "train.num_workers")) == gpu["replicas"] * gpus

    def shm(doc: dict[str, Any]) -> float:
        return quantity(dict(groups(doc))["gpu"]["template"]["spec"]["volumes"][0]["emptyDir"]["sizeLimit"])

    assert shm(job) > shm(base)


# --- the image ------------------------------------------------------------------------------


def test_dockerfile_builds_a_non_root_image_with_the_package() -> None:
    text = DOCKERFILE.read_text()
    lines = [ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines()
             if ln.strip() and not ln.strip().startswith("#")]
    stages = [ln for ln in lines if ln.upper().startswith("FROM ")]
    assert stages and any(" AS vllm" in s for s in stages)
    assert re.search(r"pip install [^\n]*torch==", text)
    assert re.search(r"pip install \"?\.\[[a-z0-9,]*s3[a-z0-9,]*\]", text)  # the package, not -e
    assert re.search(r"pip install \"?\.\[gpu,s3\]", text)
    # every stage that is a target ends as uid 1000, never root
    for i, stage in enumerate(stages):
        body = lines[lines.index(stage) + 1: lines.index(stages[i + 1]) if i + 1 < len(stages) else None]
        users = [ln.split()[1] for ln in body if ln.upper().startswith("USER ")]
        if " AS base" not in stage:
            assert users and users[-1].split(":")[0] in ("1000", "ray"), stage
    assert (REPO / "docker" / "Dockerfile.dockerignore").is_file()


def test_manifests_name_the_images_and_ray_the_repository_builds() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.MULTILINE).group(1)
    ray_version = re.search(r'"ray\[[^\]]*\]==([^"]+)"', pyproject).group(1)
    for target in TARGETS:
        docs = render(target)
        images = {c["image"] for _, c, _ in containers(docs) if "image" in c}
        assert images <= {f"vlmray:{version}", f"vlmray-vllm:{version}"}, images
        for doc in docs:
            if doc["kind"] in ("RayCluster", "RayJob"):
                assert cluster_spec(doc)["rayVersion"] == ray_version
