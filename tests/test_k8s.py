"""k8s/ manifests: RayCluster and RayJobs against the KubeRay v1.7.0 CRD schemas (unknown fields
rejected wherever a schema lists its properties), pod templates and volumes against Kubernetes'
own schemas (kubernetes-validate), and entrypoints that name modules, files and flags that exist.

The CRDs are vendored in third_party/kuberay-crds/v1.7.0 ($KUBERAY_CRDS_DIR reads others)."""
import copy
import functools
import importlib
import importlib.util
import os
import shlex
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from atcd_ray.config import parse_override

ROOT = Path(__file__).resolve().parent.parent
CRDS = Path(os.environ.get("KUBERAY_CRDS_DIR", ROOT / "third_party" / "kuberay-crds" / "v1.7.0"))
IMAGE_ROOT = "/home/ray/atcd_ray/"  # where the Dockerfile puts the project
K8S_VERSION = "1.32.0"
DOCUMENTS = [(path.name, i, doc) for path in sorted((ROOT / "k8s").glob("*.yaml"))
             for i, doc in enumerate(yaml.safe_load_all(path.read_text())) if doc]
RAY_DOCUMENTS = [(name, doc) for name, _, doc in DOCUMENTS if doc["apiVersion"] == "ray.io/v1"]


def _closed(schema):
    """The OpenAPI schema as JSON Schema that rejects properties it does not list."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


@functools.lru_cache
def _schema(kind):
    assert CRDS.is_dir(), f"KubeRay CRDs not found at {CRDS}: set KUBERAY_CRDS_DIR"
    for path in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
            return _closed(version["schema"]["openAPIV3Schema"])
    raise AssertionError(f"no CRD for {kind} in {CRDS}")


def _validate(doc):
    jsonschema.Draft7Validator(_schema(doc["kind"])).validate(doc)


def _cluster_specs(doc):
    return [doc["spec"]] if doc["kind"] == "RayCluster" else [doc["spec"]["rayClusterSpec"]]


def _pod_templates(doc):
    for spec in _cluster_specs(doc):
        yield "head", spec["headGroupSpec"]["template"]
        for group in spec["workerGroupSpecs"]:
            yield group["groupName"], group["template"]


def _every_pod(doc):
    """Every pod the document makes: head, workers, a RayJob's submitter."""
    yield from _pod_templates(doc)
    if doc["kind"] == "RayJob":
        yield "submitter", doc["spec"]["submitterPodTemplate"]


# The restricted Pod Security Standard (Kubernetes 1.32), rule by rule, as the admission
# controller reads a pod; plus the two hardening rules of issue 11 beyond it.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def restricted_violations(pod_spec: dict, extra_containers: list[dict] = ()) -> list[str]:
    found = []
    pod_sc = pod_spec.get("securityContext", {})
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(field):
            found.append(f"{field} is set")
    for volume in pod_spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']} is {sorted(kinds)}")
    if pod_sc.get("runAsUser") == 0:
        found.append("pod runAsUser is 0")
    containers = pod_spec["containers"] + pod_spec.get("initContainers", []) + list(extra_containers)
    for c in containers:
        sc, name = c.get("securityContext", {}), c.get("name", "autoscaler")
        if sc.get("privileged"):
            found.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation is not false")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            found.append(f"{name}: capabilities do not drop ALL")
        if set(sc.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: adds capabilities")
        if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            found.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser") == 0:
            found.append(f"{name}: runAsUser is 0")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile is {seccomp!r}")
        if any("hostPort" in port for port in c.get("ports", [])):
            found.append(f"{name}: hostPort")
        if not sc.get("readOnlyRootFilesystem"):  # beyond the standard
            found.append(f"{name}: root filesystem is writable")
    return found


def test_the_manifests_are_there():
    kinds = sorted(doc["kind"] for _, doc in RAY_DOCUMENTS)
    assert kinds == ["RayCluster", "RayJob", "RayJob"]
    assert (ROOT / "Dockerfile").is_file()


@pytest.mark.parametrize("name, doc", RAY_DOCUMENTS, ids=[n for n, _ in RAY_DOCUMENTS])
def test_ray_manifests_match_the_kuberay_schema(name, doc):
    _validate(doc)


def test_the_schema_check_rejects_unknown_and_mistyped_fields():
    cluster = next(doc for _, doc in RAY_DOCUMENTS if doc["kind"] == "RayCluster")
    typo = copy.deepcopy(cluster)
    typo["spec"]["headGroupSpec"]["rayStartParam"] = typo["spec"]["headGroupSpec"].pop("rayStartParams")
    with pytest.raises(jsonschema.ValidationError, match="rayStartParam"):
        _validate(typo)
    deep = copy.deepcopy(cluster)
    deep["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(jsonschema.ValidationError, match="volumeMount"):
        _validate(deep)
    mistyped = copy.deepcopy(cluster)
    mistyped["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    with pytest.raises(jsonschema.ValidationError):
        _validate(mistyped)


@pytest.mark.parametrize("name, doc", RAY_DOCUMENTS, ids=[n for n, _ in RAY_DOCUMENTS])
def test_pods_are_valid_gpu_ready_and_non_root(name, doc):
    groups = dict(_pod_templates(doc))
    assert set(groups) == {"head", "gpu"}
    for group, template in groups.items():
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{group}-pod"}, "spec": template["spec"]}
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] != 0
        (container,) = spec["containers"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert mounts["/runs"]["name"] in volumes and mounts["/data"]["readOnly"]
        claims = {v["persistentVolumeClaim"]["claimName"] for v in volumes.values() if "persistentVolumeClaim" in v}
        assert claims == {"atcd-datasets", "atcd-runs"}
        if group == "gpu":
            assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]
            shm = volumes[mounts["/dev/shm"]["name"]]
            assert shm["emptyDir"]["medium"] == "Memory"


def test_storage_claims_are_valid_and_shared():
    claims = [doc for name, _, doc in DOCUMENTS if doc["kind"] == "PersistentVolumeClaim"]
    assert {c["metadata"]["name"] for c in claims} == {"atcd-datasets", "atcd-runs"}
    for claim in claims:
        kubernetes_validate.validate(claim, K8S_VERSION, strict=True)
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every pod mounts them


@pytest.mark.parametrize("name, doc", [(n, d) for n, d in RAY_DOCUMENTS if d["kind"] == "RayJob"],
                         ids=[n for n, d in RAY_DOCUMENTS if d["kind"] == "RayJob"])
def test_job_entrypoints_run_modules_and_flags_that_exist(name, doc):
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"]
    module = argv[2]
    assert importlib.util.find_spec(module) is not None, module
    args = [a.replace(IMAGE_ROOT, f"{ROOT}/") for a in argv[3:]]
    cli = importlib.import_module(module)
    parsed = cli.parser().parse_args(args)  # every flag exists (argparse exits otherwise)
    overrides = [parse_override(s) for s in parsed.set]
    if module == "atcd_ray.train":
        from atcd_ray.config import load_config

        cfg = load_config(parsed.dataset, None, overrides)
        assert cfg.data.batch_size % parsed.workers[1] == 0 and parsed.gpu
    else:
        from atcd_ray.search_space import load_search_space

        study = load_search_space(parsed.space, overrides)  # the space file exists and is valid
        assert study.dataset == "imagenet" and parsed.gpu and parsed.resume
    spec = _cluster_specs(doc)[0]
    low, high = parsed.workers
    trials = getattr(parsed, "max_concurrent", None) or 1

    def gpus(replicas: str) -> int:
        return sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) * g[replicas]
                   for g in spec["workerGroupSpecs"])

    assert gpus("replicas") >= high * trials  # the job fits its cluster
    if low < high:  # elastic: it starts on the fewest pods the group scales down to, and the group can scale
        assert spec.get("enableInTreeAutoscaling") and gpus("minReplicas") >= low * trials and \
            gpus("maxReplicas") >= high * trials


@pytest.mark.parametrize("name, doc", RAY_DOCUMENTS, ids=[n for n, _ in RAY_DOCUMENTS])
def test_every_pod_passes_the_restricted_pod_security_standard(name, doc):
    for spec in _cluster_specs(doc):
        autoscaler = spec.get("autoscalerOptions", {})
        for group, template in _every_pod(doc):
            is_head = template is spec["headGroupSpec"]["template"]
            extra = [autoscaler] if is_head and spec.get("enableInTreeAutoscaling") else []
            assert restricted_violations(template["spec"], extra) == [], (name, group)
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{group}-pod"}, "spec": template["spec"]}
            kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
            # No Kubernetes API token in a pod, except the head whose autoscaler sidecar scales the
            # cluster through the API.
            assert template["spec"]["automountServiceAccountToken"] is bool(extra), (name, group)
            # Ray writes its session and the libraries their caches under /tmp: a writable volume.
            for container in template["spec"]["containers"]:
                assert {"name": "scratch", "mountPath": "/tmp"} in container["volumeMounts"]


def test_the_restricted_check_fires_on_each_rule():
    doc = next(doc for _, doc in RAY_DOCUMENTS if doc["kind"] == "RayCluster")
    good = doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    breaches = {
        "hostNetwork is set": lambda p: p.update(hostNetwork=True),
        "volume host is ['hostPath']": lambda p: p["volumes"].append({"name": "host", "hostPath": {"path": "/"}}),
        "ray-worker: privileged": lambda p: p["containers"][0]["securityContext"].update(privileged=True),
        "ray-worker: allowPrivilegeEscalation is not false":
            lambda p: p["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
        "ray-worker: capabilities do not drop ALL": lambda p: p["containers"][0]["securityContext"].pop("capabilities"),
        "ray-worker: adds capabilities":
            lambda p: p["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
        "ray-worker: runAsNonRoot is not true": lambda p: (p["securityContext"].pop("runAsNonRoot"),
                                                            p["containers"][0]["securityContext"].pop("runAsNonRoot")),
        "ray-worker: seccompProfile is 'Unconfined'": lambda p: (
            p["securityContext"].update(seccompProfile={"type": "Unconfined"}),
            p["containers"][0]["securityContext"].pop("seccompProfile")),
        "ray-worker: root filesystem is writable":
            lambda p: p["containers"][0]["securityContext"].pop("readOnlyRootFilesystem"),
    }
    assert restricted_violations(good) == []
    for message, breach in breaches.items():
        pod = copy.deepcopy(good)
        breach(pod)
        assert message in restricted_violations(pod), message


@pytest.mark.parametrize("name, doc", RAY_DOCUMENTS, ids=[n for n, _ in RAY_DOCUMENTS])
def test_ray_clusters_require_a_token_from_a_secret(name, doc):
    for spec in _cluster_specs(doc):
        assert spec["authOptions"] == {"mode": "token", "secretName": "atcd-ray-token"}
    readme = (ROOT / "k8s" / "README.md").read_text()
    assert "kubectl create secret generic atcd-ray-token --from-literal=auth_token=" in readme


def test_the_network_policy_admits_only_the_clusters_own_pods():
    (policy,) = [doc for _, _, doc in DOCUMENTS if doc["kind"] == "NetworkPolicy"]
    kubernetes_validate.validate(policy, K8S_VERSION, strict=True)
    label = policy["spec"]["podSelector"]["matchLabels"]
    assert label == {"app.kubernetes.io/part-of": "atcd-ray"} and policy["spec"]["policyTypes"] == ["Ingress"]
    for name, doc in RAY_DOCUMENTS:  # the policy covers every pod, and every pod may talk to the others
        for group, template in _every_pod(doc):
            assert template["metadata"]["labels"].items() >= label.items(), (name, group)
    own, operator = policy["spec"]["ingress"]
    assert own == {"from": [{"podSelector": {"matchLabels": label}}]}  # same namespace, any port
    assert operator["ports"] == [{"protocol": "TCP", "port": 8265}]  # the operator: the dashboard only
    assert operator["from"] == [{"namespaceSelector": {}, "podSelector": {
        "matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}]
    for rule in policy["spec"]["ingress"]:  # an empty "from" would admit every pod of the cluster
        assert rule.get("from") and all(peer.get("podSelector", {}).get("matchLabels") for peer in rule["from"])
