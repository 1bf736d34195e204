"""The cluster files under clusters/ parse, are internally consistent, and run real isosweep commands.

Nothing here talks to AWS or Kubernetes. The cluster launcher config goes through Ray's own
`prepare_config` + `validate_config` (the JSON schema `ray up` applies); the KubeRay manifests are
checked field by field against the ray.io/v1 CRDs' shape. Every `isosweep ...` command in these files
and in the cluster docs is parsed by the real CLI parser, and every spec it names must exist.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

from isosweep.cli import build_parser
from isosweep.spec import load_spec

REPO = Path(__file__).resolve().parent.parent
CLUSTERS = REPO / "clusters"
AWS = CLUSTERS / "aws-gpu.yaml"
RAYCLUSTER = CLUSTERS / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTERS / "kuberay" / "rayjob.yaml"
DOCKERFILE = CLUSTERS / "Dockerfile"
DOCS = [CLUSTERS / "README.md", REPO / "docs" / "operations.md", REPO / "docs" / "airgapped.md"]
IMAGE_REPO_DIR = "/home/ray/isosweep"  # where clusters/Dockerfile puts the checkout

# GPUs per instance for the EC2 types a config here may name (AWS instance type docs).
EC2_GPUS = {
    "g4dn.xlarge": 1, "g4dn.12xlarge": 4, "g5.xlarge": 1, "g5.2xlarge": 1, "g5.12xlarge": 4,
    "g5.48xlarge": 8, "g6.xlarge": 1, "g6.12xlarge": 4, "g6e.12xlarge": 4, "p3.8xlarge": 4,
    "p4d.24xlarge": 8, "p5.48xlarge": 8,
}
EC2_VCPUS = {"g5.12xlarge": 48, "g5.48xlarge": 192, "g6.12xlarge": 48, "p4d.24xlarge": 96, "m6i.2xlarge": 8}

COMMAND_KEYS = (
    "initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
    "head_start_ray_commands", "worker_start_ray_commands",
)


def _pinned(package: str) -> str:
    text = (REPO / "requirements" / "constraints.txt").read_text()
    match = re.search(rf"^{re.escape(package)}==([^\s;]+)", text, re.MULTILINE)
    assert match, f"{package} is not pinned in requirements/constraints.txt"
    return match.group(1)


def _load_all(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML document"
    return docs


# ----------------------------------------------------------------------------------------------------
# isosweep commands


def _isosweep_commands(text: str) -> list[list[str]]:
    """Every `isosweep ...` / `python -m isosweep[.cli] ...` command in shell-ish text, as argv lists."""
    found = []
    text = text.replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip().lstrip("#").strip().lstrip("$").strip()
        for part in re.split(r"\s*(?:&&|\|\||;|\|)\s*", line):
            try:
                tokens = shlex.split(part, comments=True)
            except ValueError:
                continue
            while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tokens[0]):  # VAR=value prefixes
                tokens = tokens[1:]
            if tokens[:1] == ["isosweep"]:
                found.append(tokens[1:])
            elif tokens[:2] == ["python", "-m"] and tokens[2:3] in (["isosweep"], ["isosweep.cli"]):
                found.append(tokens[3:])
    return found


def _check_command(argv: list[str], where: str) -> None:
    cleaned = [a for a in argv if a not in ("...", "[--set", "...]")]
    try:
        args = build_parser().parse_args(cleaned)
    except SystemExit:
        pytest.fail(f"{where}: `isosweep {' '.join(argv)}` is not a valid isosweep command line")
    spec = getattr(args, "spec", None) or getattr(args, "sweep", None)
    if not isinstance(spec, str) or not spec.endswith((".yaml", ".yml")) or spec.isupper() or "SPEC" in spec:
        return
    if spec.startswith(IMAGE_REPO_DIR + "/"):
        spec = spec[len(IMAGE_REPO_DIR) + 1:]
    path = REPO / spec
    assert path.is_file(), f"{where}: `isosweep {' '.join(argv)}` names {spec}, which is not in the repository"
    load_spec(path, check_paths=False)  # and it is a valid spec


def _aws_commands(cfg: dict) -> list[str]:
    cmds = []
    for key in COMMAND_KEYS:
        cmds += cfg.get(key) or []
    for node in cfg["available_node_types"].values():
        for key in COMMAND_KEYS:
            cmds += node.get(key) or []
    return cmds


def test_every_isosweep_command_in_cluster_files_and_docs_is_real():
    sources = {p: p.read_text() for p in [AWS, RAYCLUSTER, RAYJOB, DOCKERFILE, *DOCS] if p.exists()}
    entry = _load_all(RAYJOB)[0]["spec"]["entrypoint"]
    sources["rayjob entrypoint"] = entry  # folded YAML: parsed, not raw text
    aws_cmds = "\n".join(_aws_commands(yaml.safe_load(AWS.read_text())))
    sources["aws commands"] = aws_cmds
    total = 0
    for where, text in sources.items():
        for argv in _isosweep_commands(text):
            _check_command(argv, str(where))
            total += 1
    assert _isosweep_commands(entry), "the RayJob's entrypoint must be an isosweep command"
    assert _isosweep_commands(entry)[0][0] == "run"
    assert total >= 5, f"expected the cluster files and docs to show isosweep commands, found {total}"


def test_command_extraction_handles_shell_forms():
    text = "cd x && isosweep run a.yaml --set search.num_trials=2; echo ok\n# $ python -m isosweep.cli validate b.yaml"
    assert _isosweep_commands(text) == [["run", "a.yaml", "--set", "search.num_trials=2"], ["validate", "b.yaml"]]
    with pytest.raises(pytest.fail.Exception):
        _check_command(["run"], "here")  # no spec
    with pytest.raises(AssertionError):
        _check_command(["validate", "search_spaces/no-such-spec.yaml"], "here")


# ----------------------------------------------------------------------------------------------------
# AWS cluster launcher


@pytest.fixture(scope="module")
def aws() -> dict:
    cfg = yaml.safe_load(AWS.read_text())
    assert isinstance(cfg, dict)
    return cfg


def test_aws_config_passes_rays_own_schema(aws):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(aws)))  # what `ray up` runs before touching AWS


def test_aws_config_required_keys_and_node_types(aws):
    assert aws["cluster_name"]
    provider = aws["provider"]
    assert provider["type"] == "aws" and provider["region"] and provider["availability_zone"]
    assert all(z.startswith(provider["region"]) for z in provider["availability_zone"].split(","))
    types = aws["available_node_types"]
    assert aws["head_node_type"] in types
    assert aws["idle_timeout_minutes"] > 0
    for name, node in types.items():
        if name == aws["head_node_type"]:
            continue
        assert node.get("max_workers", 0) <= aws["max_workers"], f"{name}: max_workers above the cluster's"
        assert 0 <= node.get("min_workers", 0) <= node.get("max_workers", 0)
    for name, node in types.items():
        image = node["node_config"]["ImageId"]
        assert image.startswith(("ami-", "resolve:ssm:")), f"{name}: ImageId {image!r}"
        assert "Arn" in node["node_config"]["IamInstanceProfile"], f"{name}: no instance profile (S3 access)"


def test_aws_gpu_worker_type_declares_its_gpus(aws):
    types = aws["available_node_types"]
    gpu_types = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types, "no node type declares GPU resources"
    for name, node in gpu_types.items():
        assert name != aws["head_node_type"]
        itype = node["node_config"]["InstanceType"]
        assert itype in EC2_GPUS, f"{name}: {itype} is not a known GPU instance type"
        assert node["resources"]["GPU"] == EC2_GPUS[itype], f"{name}: resources.GPU != GPUs of {itype}"
        if itype in EC2_VCPUS:
            assert node["resources"].get("CPU", EC2_VCPUS[itype]) <= EC2_VCPUS[itype]
        assert node.get("max_workers", 0) >= 1
    head = types[aws["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0


def test_aws_cluster_fits_the_celebahq_spec(aws):
    spec = load_spec(REPO / "search_spaces" / "celebahq.yaml", check_paths=False)
    need_gpu = spec.resources.workers_per_trial * spec.resources.gpus_per_worker
    need_cpu = spec.resources.workers_per_trial * spec.resources.cpus_per_worker
    gpu_nodes = [t for t in aws["available_node_types"].values() if t["resources"].get("GPU", 0) > 0]
    max_gpu = sum(t["resources"]["GPU"] * t["max_workers"] for t in gpu_nodes)
    max_cpu = sum(t["resources"].get("CPU", 0) * t["max_workers"] for t in gpu_nodes)
    assert need_gpu <= max_gpu and need_cpu <= max_cpu
    # the sweep checks the *current* cluster before it starts, so the GPU type keeps enough nodes up
    min_gpu = sum(t["resources"]["GPU"] * t.get("min_workers", 0) for t in gpu_nodes)
    assert need_gpu <= min_gpu, "min_workers of the GPU type must hold one trial (the sweep checks at start)"


def test_aws_nodes_install_the_package_and_use_token_auth(aws):
    ray_version = _pinned("ray")
    assert aws["docker"]["image"].startswith(f"rayproject/ray:{ray_version}-"), "image's Ray != pinned Ray"
    setup = "\n".join(aws["setup_commands"])
    assert "pip install" in setup and "-e ~/isosweep" in setup and "constraints.txt" in setup
    assert aws["file_mounts"]["~/isosweep"] == "."
    assert "~/.ray/auth_token" in aws["file_mounts"], "the token must reach every node"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = "\n".join(aws[key])
        assert "RAY_AUTH_MODE=token" in start, f"{key}: token auth off"
    head = "\n".join(aws["head_start_ray_commands"])
    assert "--head" in head and "--dashboard-port=8265" in head and "--autoscaling-config" in head
    assert "$RAY_HEAD_IP:6379" in "\n".join(aws["worker_start_ray_commands"])
    excluded = set(aws["rsync_exclude"])
    assert {".venv", "runs", ".git"} <= excluded, "never rsync environments or results to the nodes"


# ----------------------------------------------------------------------------------------------------
# KubeRay


def _cluster_specs() -> list[tuple[str, dict]]:
    out = []
    for doc in _load_all(RAYCLUSTER):
        if doc["kind"] == "RayCluster":
            out.append(("RayCluster", doc["spec"]))
    for doc in _load_all(RAYJOB):
        if doc["kind"] == "RayJob":
            out.append(("RayJob.rayClusterSpec", doc["spec"]["rayClusterSpec"]))
    return out


def _quantity(q: str | int | float) -> float:
    """Kubernetes quantities as numbers: '40', '500m', '160Gi'."""
    q = str(q)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if q.endswith(suffix):
            return float(q[: -len(suffix)]) * factor
    return float(q)


def _check_pod(template: dict, where: str, service_accounts: set[str]) -> list[dict]:
    pod = template["spec"]
    containers = pod["containers"]
    assert containers and all(c.get("image") for c in containers), f"{where}: container without image"
    if pod.get("serviceAccountName"):
        assert pod["serviceAccountName"] in service_accounts, f"{where}: unknown service account"
    volumes = {v["name"] for v in pod.get("volumes", [])}
    for c in containers:
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes, f"{where}: mount {m['name']} has no volume"
        res = c.get("resources", {})
        for key, limit in res.get("limits", {}).items():
            request = res.get("requests", {}).get(key)
            if request is not None:
                assert _quantity(request) <= _quantity(limit), f"{where}: {key} request above limit"
        env = {e["name"] for e in c.get("env", [])}
        assert "MLFLOW_TRACKING_URI" in env, f"{where}: MLFLOW_TRACKING_URI not set"
    return containers


def test_kuberay_manifests_shape():
    kinds = {d["kind"]: d for d in _load_all(RAYCLUSTER) + _load_all(RAYJOB)}
    assert {"RayCluster", "RayJob", "ServiceAccount"} <= set(kinds)
    for kind in ("RayCluster", "RayJob"):
        assert kinds[kind]["apiVersion"] == "ray.io/v1", f"{kind}: apiVersion"
        assert kinds[kind]["metadata"]["name"]
    job = kinds["RayJob"]["spec"]
    assert job["entrypoint"].strip() and job["shutdownAfterJobFinishes"] is True
    assert job.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
    assert "arn:aws:iam::" in kinds["ServiceAccount"]["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]


@pytest.mark.parametrize("where,spec", _cluster_specs(), ids=lambda v: v if isinstance(v, str) else "")
def test_kuberay_cluster_spec_is_consistent(where, spec):
    ray_version = _pinned("ray")
    service_accounts = {d["metadata"]["name"] for d in _load_all(RAYCLUSTER) if d["kind"] == "ServiceAccount"}
    assert spec["rayVersion"] == ray_version, f"{where}: rayVersion != pinned ray"
    assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: token auth off"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("dashboard-host") == "0.0.0.0"
    head_containers = _check_pod(head["template"], f"{where} head", service_accounts)
    ports = {p["containerPort"] for p in head_containers[0].get("ports", [])}
    assert {6379, 8265} <= ports, f"{where}: head must expose GCS 6379 and dashboard 8265"
    images = {c["image"] for c in head_containers}
    gpu_groups = 0
    for group in spec["workerGroupSpecs"]:
        gwhere = f"{where} group {group['groupName']}"
        assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"], gwhere
        containers = _check_pod(group["template"], gwhere, service_accounts)
        images |= {c["image"] for c in containers}
        ray_container = containers[0]  # KubeRay treats the first container as the Ray container
        limits = ray_container["resources"]["limits"]
        requests = ray_container["resources"].get("requests", {})
        gpus = int(_quantity(limits.get("nvidia.com/gpu", 0)))
        if gpus:
            gpu_groups += 1
            # extended resources: the request, when given, must equal the limit
            assert int(_quantity(requests.get("nvidia.com/gpu", gpus))) == gpus, f"{gwhere}: GPU request != limit"
            if "num-gpus" in group["rayStartParams"]:
                assert int(group["rayStartParams"]["num-gpus"]) == gpus, f"{gwhere}: num-gpus != nvidia.com/gpu limit"
            if "num-cpus" in group["rayStartParams"]:
                assert float(group["rayStartParams"]["num-cpus"]) <= _quantity(limits["cpu"])
            tolerations = group["template"]["spec"].get("tolerations", [])
            assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), f"{gwhere}: no GPU toleration"
    assert gpu_groups >= 1, f"{where}: no worker group requests nvidia.com/gpu"
    assert len(images) == 1, f"{where}: head and workers should run the same image, got {images}"
    spec_file = load_spec(REPO / "search_spaces" / "celebahq.yaml", check_paths=False)
    res = spec_file.resources
    per_pod = max(int(_quantity(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)))
                  for g in spec["workerGroupSpecs"])
    max_gpus = sum(per_pod * g["maxReplicas"] for g in spec["workerGroupSpecs"])
    assert res.workers_per_trial * res.gpus_per_worker <= max_gpus, f"{where}: one celebahq trial does not fit"


def test_images_match_the_pinned_ray_and_the_dockerfile():
    ray_version = _pinned("ray")
    text = DOCKERFILE.read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.MULTILINE).group(1)
    assert base.startswith(f"rayproject/ray:{ray_version}-"), f"Dockerfile base {base} != Ray {ray_version}"
    assert re.search(rf"^WORKDIR\s+{re.escape(IMAGE_REPO_DIR)}\s*$", text, re.MULTILINE)
    assert "COPY --chown=ray:users search_spaces/" in text and "constraints.txt" in text
    for rel in ("pyproject.toml", "requirements", "isosweep", "search_spaces"):
        assert (REPO / rel).exists(), f"the Dockerfile copies {rel}, which is missing"
