"""The cluster manifests, the cluster images and the working-dir upload stay valid and consistent.

- `cluster/aws.yaml` and `cluster/gcp.yaml` pass the JSON schema Ray ships and Ray's own config checks;
- the KubeRay manifests are `ray.io/v1` RayCluster / RayJob with string `rayStartParams`;
- every manifest runs an image built in `infra/docker/`, tagged with the package version, on the same Ray;
- no manifest carries a credential;
- `ray job submit --working-dir .` leaves `.venv` (and run outputs) out, checked with Ray's packaging code.

No network, no cloud, no Ray runtime: everything here reads files or calls Ray's pure helpers.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
import zipfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER = REPO_ROOT / "cluster"
DOCKER = REPO_ROOT / "infra" / "docker"
LAUNCHER_CONFIGS = {"aws": CLUSTER / "aws.yaml", "gcp": CLUSTER / "gcp.yaml"}
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob-train.yaml"
MANIFESTS = [*LAUNCHER_CONFIGS.values(), RAYCLUSTER, RAYJOB]
PACKAGE_VERSION = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
NEVER_UPLOADED = (".venv", ".git", "demo_out", "runs")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------------------------------------------------
# Ray cluster launcher configs


def ray_schema() -> dict[str, Any]:
    return json.loads((resources.files("ray.autoscaler") / "ray-schema.json").read_text())


@pytest.mark.parametrize("provider", sorted(LAUNCHER_CONFIGS))
def test_launcher_config_passes_ray_schema_and_ray_checks(provider: str) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_yaml(LAUNCHER_CONFIGS[provider])
    jsonschema.validate(config, ray_schema())
    # What `ray up` does before it talks to the cloud: fill defaults, merge commands, validate again.
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["provider"]["type"] == provider
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


def test_schema_check_is_not_vacuous() -> None:
    config = load_yaml(LAUNCHER_CONFIGS["aws"])
    config["available_node_types"]["gpu_worker"]["min_worker"] = 1  # a typo Ray would ignore at runtime
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        jsonschema.validate(config, ray_schema())


def _gpu_node_types(config: dict[str, Any]) -> list[str]:
    """Node types with GPUs: declared in `resources` (GCP) or implied by an AWS GPU instance family."""
    names = []
    for name, node_type in config["available_node_types"].items():
        declared = node_type["resources"].get("GPU", 0)
        instance = str(node_type["node_config"].get("InstanceType", ""))
        if declared > 0 or re.match(r"(g\d|p\d)", instance):
            names.append(name)
    return names


@pytest.mark.parametrize("provider", sorted(LAUNCHER_CONFIGS))
def test_launcher_layout_cpu_head_gpu_workers(provider: str) -> None:
    config = load_yaml(LAUNCHER_CONFIGS[provider])
    images = built_images()
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head must not take tasks away from drivers and controllers"
    assert config["docker"]["head_image"] == images["Dockerfile"]

    gpu_types = _gpu_node_types(config)
    assert gpu_types, "no GPU worker type"
    for name in gpu_types:
        node_type = config["available_node_types"][name]
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"]
        worker_image = node_type.get("docker", {}).get("worker_image", config["docker"]["worker_image"])
        assert worker_image == images["Dockerfile.cuda"], f"{name} must run the CUDA image"
    for name, node_type in config["available_node_types"].items():
        if name not in gpu_types and name != config["head_node_type"]:
            assert node_type["docker"]["worker_image"] == images["Dockerfile"], f"{name} must run the CPU image"

    head_start = " ".join(config["head_start_ray_commands"])
    assert "--object-store-memory=" in head_start and "--head" in head_start
    # The image check run on every node names the Ray the project pins.
    assert f"ray.__version__ == '{ray.__version__}'" in " ".join(config["setup_commands"])


# ---------------------------------------------------------------------------------------------------------
# KubeRay


def _walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _cluster_spec(path: Path) -> dict[str, Any]:
    manifest = load_yaml(path)
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


@pytest.mark.parametrize(("path", "kind"), [(RAYCLUSTER, "RayCluster"), (RAYJOB, "RayJob")], ids=["cluster", "job"])
def test_kuberay_manifest_kind_version_and_groups(path: Path, kind: str) -> None:
    documents = list(yaml.safe_load_all(path.read_text()))
    assert [(d["apiVersion"], d["kind"]) for d in documents] == [("ray.io/v1", kind)]
    spec = _cluster_spec(path)
    assert spec["rayVersion"] == ray.__version__
    images = built_images()
    head = spec["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["image"] == images["Dockerfile"]
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_groups, "no GPU worker group"
    for group in gpu_groups:
        assert group["template"]["spec"]["containers"][0]["image"] == images["Dockerfile.cuda"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for group in [head, *spec["workerGroupSpecs"]]:
        # ray.io/v1 types rayStartParams as map[string]string: a bare number fails the CRD validation.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group["rayStartParams"]


def test_rayjob_runs_the_training_module_from_the_image() -> None:
    job = load_yaml(RAYJOB)["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:3] == ["python", "-m", "p2es_dist.jobs.train"]
    assert argv[argv.index("--config") + 1] == "p2es_dist/configs/p2es_bidmc.yaml"
    overrides = dict(argv[i + 1].split("=", 1) for i, arg in enumerate(argv) if arg == "--set")
    assert overrides["train.storage_path"].startswith("s3://")
    # Its workers are GPU pods: training must ask for GPUs, at most one worker per GPU pod.
    assert overrides["train.use_gpu"] == "true"
    gpu_group = job["rayClusterSpec"]["workerGroupSpecs"][0]
    assert int(overrides["train.num_workers"]) <= gpu_group["maxReplicas"]
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    # The relative --config path resolves because the driver starts in the image's source tree.
    workdir = re.search(r"^WORKDIR (\S+)$", (DOCKER / "Dockerfile").read_text(), re.M).group(1)
    assert runtime_env["working_dir"] == f"local://{workdir}"
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**runtime_env)  # Ray accepts it as written


def test_rayjob_entrypoint_names_files_that_exist() -> None:
    argv = shlex.split(load_yaml(RAYJOB)["spec"]["entrypoint"])
    module = REPO_ROOT / (argv[2].replace(".", "/") + ".py")
    config = REPO_ROOT / argv[argv.index("--config") + 1]
    missing = [str(p.relative_to(REPO_ROOT)) for p in (module, config) if not p.exists()]
    assert not missing, f"rayjob-train.yaml's entrypoint names files the repository does not ship: {missing}"


# ---------------------------------------------------------------------------------------------------------
# Images


def built_images() -> dict[str, str]:
    """Dockerfile name -> image tag, from the `docker build -f ... -t ...` lines of infra/docker/README.md."""
    images: dict[str, str] = {}
    for line in (DOCKER / "README.md").read_text().splitlines():
        if not line.startswith("docker build"):
            continue
        argv = shlex.split(line.rstrip("\\"))
        if "-f" in argv and "-t" in argv:
            images.setdefault(Path(argv[argv.index("-f") + 1]).name, argv[argv.index("-t") + 1])
    return images


def manifest_images(path: Path) -> set[str]:
    config = load_yaml(path)
    if path in LAUNCHER_CONFIGS.values():
        found = {config["docker"].get(k) for k in ("image", "head_image", "worker_image")}
        found |= {t.get("docker", {}).get("worker_image") for t in config["available_node_types"].values()}
        return found - {None}
    return {node["image"] for node in _walk(config) if isinstance(node, dict) and "image" in node}


def test_images_are_tagged_with_the_package_version_on_the_pinned_ray() -> None:
    images = built_images()
    assert set(images) == {"Dockerfile", "Dockerfile.cuda"}
    assert images["Dockerfile"].endswith(f":{PACKAGE_VERSION}")
    assert images["Dockerfile.cuda"] == images["Dockerfile"] + "-cuda"
    for dockerfile, image in images.items():
        text = (DOCKER / dockerfile).read_text()
        assert f"-t {image} ." in text, f"{dockerfile}'s build comment disagrees with infra/docker/README.md"
        base = re.search(r"^ARG RAY_IMAGE=(\S+)$", text, re.M).group(1)
        assert base.startswith(f"rayproject/ray:{ray.__version__}-py311-"), base
        assert re.search(r"^ARG TORCH_VERSION=2\.13\.0$", text, re.M), "torch must stay pinned to 2.13.0"
    assert (DOCKER / "Dockerfile").read_text().count("whl/cpu") == 1


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_runs_only_the_images_built_in_infra_docker(path: Path) -> None:
    used = manifest_images(path)
    assert used, f"{path.name} names no image"
    assert used <= set(built_images().values()), f"{path.name} runs images not built in infra/docker: {used}"


# ---------------------------------------------------------------------------------------------------------
# Secrets

_CREDENTIAL_NAME = (
    r"(?:AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|AWS_SESSION_TOKEN|SECRET_?KEY|ACCESS_?KEY|PASSWORD|TOKEN)"
)
_SECRET_PATTERNS = [
    # `AWS_SECRET_ACCESS_KEY: value`, `--env AWS_SECRET_ACCESS_KEY=value`, `secretKey: "value"` ...
    re.compile(rf"(?i){_CREDENTIAL_NAME}\s*[:=]\s*[\"']?[A-Za-z0-9/+_\-]{{8,}}"),
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]


def find_secrets(text: str) -> list[str]:
    """Lines that look like a literal credential, plus Kubernetes env entries that inline one."""
    hits = [line.strip() for line in text.splitlines() if any(p.search(line) for p in _SECRET_PATTERNS)]
    for document in yaml.safe_load_all(text):
        for node in _walk(document):
            if not isinstance(node, dict):
                continue
            if node.get("kind") == "Secret":
                hits.append("a Kubernetes Secret object")
            name = node.get("name")
            if isinstance(name, str) and "value" in node and re.fullmatch(rf"(?i)\w*{_CREDENTIAL_NAME}\w*", name):
                hits.append(f"env {name} with an inline value")
    return hits


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_holds_no_credentials(path: Path) -> None:
    assert find_secrets(path.read_text()) == []


def test_kuberay_credentials_come_from_a_secret_reference() -> None:
    for path in (RAYCLUSTER, RAYJOB):
        refs = [node["valueFrom"]["secretKeyRef"] for node in _walk(load_yaml(path))
                if isinstance(node, dict) and node.get("name") == "AWS_SECRET_ACCESS_KEY"]
        assert refs and all(ref["name"] == "p2es-s3-credentials" for ref in refs), path.name


@pytest.mark.parametrize("leak", [
    "AWS_SECRET_ACCESS_KEY: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "run_options: ['--env AWS_SECRET_ACCESS_KEY=0123456789abcdef']",
    "note: AKIAIOSFODNN7EXAMPLE",
    "env: [{name: AWS_SECRET_ACCESS_KEY, value: hunter22}]",
    "apiVersion: v1\nkind: Secret\nstringData: {k: v}",
])
def test_secret_finder_flags_literal_credentials(leak: str) -> None:
    assert find_secrets(leak)


def test_secret_finder_accepts_a_secret_key_ref() -> None:
    ok = "env: [{name: AWS_SECRET_ACCESS_KEY, valueFrom: {secretKeyRef: {name: s, key: AWS_SECRET_ACCESS_KEY}}}]"
    assert find_secrets(ok) == []


# ---------------------------------------------------------------------------------------------------------
# What `ray job submit --working-dir .` uploads


def upload_names(working_dir: Path, zip_path: Path, *, runtime_env: dict | None = None,
                 include_gitignore: bool = True) -> list[str]:
    """Names in the zip `ray job submit --working-dir DIR` would upload, built by Ray's own functions.

    The job SDK resolves the excludes (defaults + runtime_env `excludes`) in `upload_working_dir_if_needed`
    and zips with `create_package`, which also applies .gitignore / .rayignore files while walking.
    """
    from ray._private.runtime_env.packaging import create_package
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    resolved: dict[str, list[str]] = {}

    def capture(path: str, excludes: list[str], is_file: bool = False) -> None:
        resolved["excludes"] = excludes

    env = {**(runtime_env or {}), "working_dir": str(working_dir)}
    upload_working_dir_if_needed(env, include_gitignore=include_gitignore, upload_fn=capture)
    create_package(str(working_dir), zip_path, include_gitignore=include_gitignore, excludes=resolved["excludes"])
    return zipfile.ZipFile(zip_path).namelist()


def _top_levels(names: list[str]) -> set[str]:
    return {name.split("/")[0] for name in names}


def test_this_repository_uploads_without_venv_or_outputs(tmp_path: Path) -> None:
    names = upload_names(REPO_ROOT, tmp_path / "pkg.zip")
    assert not _top_levels(names) & set(NEVER_UPLOADED)
    assert {"pyproject.toml", "p2es_dist/__init__.py", "p2es_dist/jobs/common.py"} <= set(names)


def _scratch_tree(root: Path) -> Path:
    for relative in (".venv/lib/python3.11/site-packages/torch/__init__.py", ".git/HEAD", "demo_out/report.md",
                     "runs/trial_0/checkpoint.pt", "p2es_dist/__init__.py", "p2es_dist/jobs/runs.py"):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text("x")
    return root


def test_rayignore_alone_keeps_venv_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every other safeguard off: Ray's default excludes and .gitignore handling.
    monkeypatch.setenv("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", "")
    tree = _scratch_tree(tmp_path / "tree")

    unprotected = upload_names(tree, tmp_path / "before.zip", include_gitignore=False)
    assert {".venv", ".git", "runs"} <= _top_levels(unprotected), "the scratch tree must leak without .rayignore"

    (tree / ".rayignore").write_text((REPO_ROOT / ".rayignore").read_text())
    names = upload_names(tree, tmp_path / "after.zip", include_gitignore=False)
    assert not _top_levels(names) & set(NEVER_UPLOADED)
    # Anchored patterns: only the top-level run folders go, not a module that happens to be named so.
    assert {"p2es_dist/__init__.py", "p2es_dist/jobs/runs.py"} <= set(names)


def readme_runtime_envs() -> list[dict[str, Any]]:
    text = (CLUSTER / "README.md").read_text()
    found = re.findall(r"P2ES_RUNTIME_ENV='([^']+)'", text) + re.findall(r"--runtime-env-json '([^']+)'", text)
    return [json.loads(raw) for raw in found]


def test_readme_runtime_env_is_valid_and_excludes_venv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.runtime_env import RuntimeEnv

    envs = readme_runtime_envs()
    assert envs, "cluster/README.md shows no runtime environment"
    # Defaults and .gitignore off, no .rayignore in the tree: the documented `excludes` must do it alone.
    monkeypatch.setenv("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", "")
    for index, env in enumerate(envs):
        RuntimeEnv(**env)
        assert "AWS_ENDPOINT_URL" in env["env_vars"]
        assert not [k for k in env["env_vars"] if re.search(_CREDENTIAL_NAME, k)], "credentials in env_vars"
        tree = _scratch_tree(tmp_path / f"tree{index}")
        names = upload_names(tree, tmp_path / f"tree{index}.zip", runtime_env=env, include_gitignore=False)
        assert not _top_levels(names) & set(NEVER_UPLOADED)
        assert "p2es_dist/jobs/runs.py" in names


def test_a_job_whose_runtime_env_sets_the_endpoint_still_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """`ray job submit --runtime-env-json '{"env_vars": {"AWS_ENDPOINT_URL": ...}}'`: the driver's ray.init
    must not set that variable again, or Ray refuses to merge the two runtime envs and the job stops."""
    import json

    from ray._private.worker import _merge_runtime_env

    from p2es_dist.jobs.common import JOB_CONFIG_ENV, forwarded_env_vars

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://local:8333")
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    job_env = {"env_vars": {"AWS_ENDPOINT_URL": "https://s3.us-west-2.amazonaws.com"}}
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": job_env, "metadata": {}}))
    ours = forwarded_env_vars()
    assert ours["AWS_REGION"] == "us-west-2" and "AWS_ENDPOINT_URL" not in ours
    merged = _merge_runtime_env(job_env, {"env_vars": ours})
    assert merged["env_vars"]["AWS_ENDPOINT_URL"] == "https://s3.us-west-2.amazonaws.com"  # the job's value
    # Without a submitted job (a laptop run) the endpoint is forwarded as before.
    monkeypatch.delenv(JOB_CONFIG_ENV)
    assert forwarded_env_vars()["AWS_ENDPOINT_URL"] == "http://local:8333"
