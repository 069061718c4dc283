"""docker/ and deploy/ checked offline: lint, structure, and the manifests against their real schemas.

No image is built or pulled here (no Docker engine, no registry): what these tests cannot show is listed in
the README's "Deploy" section. The entrypoints themselves run in tests/integration/test_installed_package.py.
"""

from __future__ import annotations

import gzip
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"triton": ROOT / "docker" / "triton" / "Dockerfile", "torchserve": ROOT / "docker" / "torchserve" / "Dockerfile"}
KSERVE_SCHEMAS = ROOT / "tests" / "data" / "kserve"
K8S_VERSION = "1.30"  # the oldest Kubernetes the manifests are checked against (strict: no unknown fields)


def tracked_files() -> set[str]:
    """The files of a clean checkout (git ls-files), or every file when this is no git checkout."""
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()}
    return set(out.split())


def instructions(path: Path) -> list[dict]:
    return DockerfileParser(str(path)).structure


def stages(path: Path) -> list[list[dict]]:
    """The instructions of each build stage."""
    out: list[list[dict]] = []
    for item in instructions(path):
        if item["instruction"] == "FROM":
            out.append([])
        if out:
            out[-1].append(item)
    return out


def test_hadolint_finds_no_errors():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, "--failure-threshold", "error", *map(str, DOCKERFILES.values())],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name, pattern", [
    ("triton", r"nvcr\.io/nvidia/tritonserver:(\d\d)\.(\d\d)-py3"),
    ("torchserve", r"pytorch/torchserve:0\.12\.0-gpu"),
])
def test_bases_are_pinned_official_images(name, pattern):
    parents = DockerfileParser(str(DOCKERFILES[name])).parent_images
    assert parents and all(re.fullmatch(pattern, image) for image in parents), parents
    if name == "triton":
        year, month = map(int, re.fullmatch(pattern, parents[0]).groups())
        assert (year, month) >= (25, 7), "Triton < 25.07 has the Python-backend CVEs fixed in 25.07"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_final_stage_runs_as_a_numeric_non_root_user_with_a_healthcheck(name):
    final = stages(DOCKERFILES[name])[-1]
    users = [i["value"] for i in final if i["instruction"] == "USER"]
    assert users, "the final stage sets no USER (it would run as root)"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, users[-1]
    health = [i["value"] for i in final if i["instruction"] == "HEALTHCHECK"]
    assert health and "/ready" in health[0]
    entrypoint = json.loads(next(i["value"] for i in final if i["instruction"] == "ENTRYPOINT"))
    assert entrypoint[0].startswith("/opt/tandem/")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_copy_source_is_in_a_clean_checkout(name):
    tracked = tracked_files()
    for item in instructions(DOCKERFILES[name]):
        if item["instruction"] not in ("COPY", "ADD"):
            continue
        words = [w for w in shlex.split(item["value"]) if not w.startswith("--chown") and not w.startswith("--chmod")]
        if words[0].startswith("--from="):
            continue  # from an earlier stage
        for source in words[:-1]:
            source = source.rstrip("/")
            assert source in tracked or any(f.startswith(source + "/") for f in tracked), \
                f"{name}: COPY {source} is not in a clean checkout"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_images_install_with_the_script_the_tests_run(name):
    runs = " ".join(i["value"] for i in instructions(DOCKERFILES[name]) if i["instruction"] == "RUN")
    assert "/opt/tandem/install.sh" in runs
    copies = [i["value"] for i in instructions(DOCKERFILES[name]) if i["instruction"] == "COPY"]
    assert "docker/install.sh /opt/tandem/install.sh" in copies
    test = (ROOT / "tests" / "integration" / "test_installed_package.py").read_text()
    assert "docker/install.sh" in test or '"install.sh"' in test


def test_entrypoints_are_executable_and_strict():
    for script in (ROOT / "docker" / "install.sh", ROOT / "docker" / "triton" / "entrypoint.sh",
                   ROOT / "docker" / "torchserve" / "entrypoint.sh"):
        assert script.stat().st_mode & 0o111, f"{script} is not executable"
        assert "set -euo pipefail" in script.read_text()
        subprocess.run(["bash", "-n", str(script)], check=True)  # parses


def test_compose_publishes_on_loopback_with_a_gpu_and_enough_shm():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        for port in service["ports"]:
            assert port.startswith("${TANDEM_PUBLISH:-127.0.0.1}:"), f"{name} publishes {port} beyond loopback"
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"] and devices[0]["count"] >= 1
        size = service["shm_size"]
        assert re.fullmatch(r"\d+(mb|gb)", size) and (int(size[:-2]) * (1024 if size.endswith("gb") else 1)) >= 256
        assert service["build"]["dockerfile"] in ("docker/triton/Dockerfile", "docker/torchserve/Dockerfile")
    assert compose["secrets"]["triton-keys"]["file"] == "./secrets/triton-keys.json"


def _documents(directory: Path) -> list[dict]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    documents = []
    for resource in kustomization["resources"]:
        assert (directory / resource).is_file(), f"{directory}/kustomization.yaml lists a missing {resource}"
        documents += [d for d in yaml.safe_load_all((directory / resource).read_text()) if d]
    return documents


def _users_of(dockerfile: Path) -> int:
    final = stages(dockerfile)[-1]
    return int([i["value"] for i in final if i["instruction"] == "USER"][-1].split(":")[0])


def test_kubernetes_manifests_validate_strictly_and_keep_the_safe_defaults():
    documents = _documents(ROOT / "deploy" / "kubernetes" / "base")
    kinds = sorted(d["kind"] for d in documents)
    assert kinds == ["Deployment", "Deployment", "Service", "Service"]
    services = {d["metadata"]["name"]: d for d in documents if d["kind"] == "Service"}
    for document in documents:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)
    for deployment in (d for d in documents if d["kind"] == "Deployment"):
        name = deployment["metadata"]["name"]
        pod = deployment["spec"]["template"]
        assert pod["metadata"]["labels"] == deployment["spec"]["selector"]["matchLabels"]
        assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        security = pod["spec"]["securityContext"]
        image = "triton" if "triton" in name else "torchserve"
        assert security["runAsNonRoot"] and security["runAsUser"] == _users_of(DOCKERFILES[image])
        (container,) = pod["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            check = container[probe]["httpGet"]
            assert check["port"] == "health" and ports["health"] in (8003, 8083)
            assert check["path"] == ("/live" if probe == "livenessProbe" else "/ready")
        assert str(ports["metrics"]) == pod["metadata"]["annotations"]["prometheus.io/port"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        shm = volumes[mounts["/dev/shm"]]["emptyDir"]
        assert shm["medium"] == "Memory" and shm["sizeLimit"] == "1Gi"
        service = services[name]
        assert service["spec"]["selector"] == pod["metadata"]["labels"]
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
        assert service["spec"]["type"] == "ClusterIP"  # nothing exposed beyond the cluster by default


def _kserve_schema(kind: str, version: str) -> dict:
    data = json.loads(gzip.decompress((KSERVE_SCHEMAS / f"{kind}-{version}.schema.json.gz").read_bytes()))
    return data["schema"]


def test_kserve_manifests_validate_against_the_crd_schemas_and_reference_each_other():
    documents = _documents(ROOT / "deploy" / "kserve")
    runtimes = {d["metadata"]["name"]: d for d in documents if d["kind"] == "ServingRuntime"}
    services = [d for d in documents if d["kind"] == "InferenceService"]
    assert sorted(runtimes) == ["tandem-torchserve", "tandem-triton"] and len(services) == 2
    for document in documents:
        api, version = document["apiVersion"].split("/")
        assert api == "serving.kserve.io"
        jsonschema.validate(document, _kserve_schema(document["kind"].lower(), version))
    for service in services:
        model = service["spec"]["predictor"]["model"]
        runtime = runtimes[model["runtime"]]
        assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
        assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
        assert model["resources"]["limits"]["nvidia.com/gpu"] >= 1
    for name, runtime in runtimes.items():
        (container,) = runtime["spec"]["containers"]
        image = "triton" if "triton" in name else "torchserve"
        assert container["image"].split(":")[0] == f"tandem-serve-{image}"
        assert container["securityContext"]["runAsUser"] == _users_of(DOCKERFILES[image])
        assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert {v["name"] for v in runtime["spec"]["volumes"]} >= {"dshm"}


def test_a_broken_manifest_is_caught():
    """The validators are not vacuous: an unknown field and a wrong type fail."""
    deployment = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "base" / "triton-deployment.yaml").read_text())
    deployment["spec"]["template"]["spec"]["containers"][0]["probes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    runtime = yaml.safe_load((ROOT / "deploy" / "kserve" / "servingruntime-triton.yaml").read_text())
    runtime["spec"]["supportedModelFormats"] = "tandem-triton"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(runtime, _kserve_schema("servingruntime", "v1alpha1"))


def test_the_build_context_leaves_out_environments_and_keys():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", ".carry", "docker/secrets", "**/__pycache__"} <= ignored
    for item in (i for name in DOCKERFILES for i in instructions(DOCKERFILES[name]) if i["instruction"] == "COPY"):
        sources = [w for w in shlex.split(item["value"])[:-1] if not w.startswith("--")]
        assert not any(s.rstrip("/") in ignored for s in sources), f"COPY of an ignored path: {item['value']}"
