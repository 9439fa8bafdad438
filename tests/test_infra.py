"""infra/: the manifests parse, name entrypoints that exist, and keep the
properties the deployment relies on: nothing exposed outside the cluster, MLflow
behind its basic-auth app with no default password, Ray behind token auth, every
credential from a Secret that infra/README.md tells how to create.

Schemas: with `kubernetes-validate` installed (it ships the Kubernetes OpenAPI
schemas, so it works offline) the built-in objects and every pod template inside
the KubeRay resources are validated strictly; without it that test is skipped and
the structural checks below still run.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import subprocess
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
README = INFRA / "README.md"

# The literal default password older MLflow versions shipped in basic_auth.ini.
DEFAULT_MLFLOW_PASSWORD = "password" + "1234"
SECRET_ENV = re.compile(r"PASSWORD|TOKEN|SECRET|ACCESS_KEY", re.IGNORECASE)
PYTHON_MODULE = re.compile(r"\bpython[0-9.]*\s+-m\s+([A-Za-z_][\w.]*)")


# --- loading -------------------------------------------------------------------------


def yaml_paths() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


def text_paths() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


@cache
def documents() -> tuple[tuple[str, dict], ...]:
    """(where, object) for every YAML document in infra/, and for manifests kept as
    text inside a ConfigMap (the retraining RayJob template)."""
    found = []
    for path in yaml_paths():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            where = str(path.relative_to(ROOT))
            found.append((where, doc))
            if doc.get("kind") == "ConfigMap":
                for key, text in (doc.get("data") or {}).items():
                    if key.endswith((".yaml", ".yml")):
                        found += [(f"{where}:{key}", inner) for inner in yaml.safe_load_all(text) if inner]
    return tuple(found)


def objects(kind: str) -> list[tuple[str, dict]]:
    return [(where, doc) for where, doc in documents() if doc.get("kind") == kind]


def one(kind: str, name: str) -> dict:
    matches = [doc for _, doc in objects(kind) if doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name!r} in infra/, found {len(matches)}"
    return matches[0]


def ray_cluster_specs() -> list[tuple[str, dict]]:
    """Every RayCluster spec: standalone clusters and those RayJobs bring up."""
    specs = [(where, doc["spec"]) for where, doc in objects("RayCluster")]
    specs += [
        (where, doc["spec"]["rayClusterSpec"]) for where, doc in objects("RayJob") if "rayClusterSpec" in doc["spec"]
    ]
    return specs


def ray_pod_templates(spec: dict) -> list[tuple[str, dict]]:
    templates = [("head", spec["headGroupSpec"]["template"])]
    templates += [(f"worker group {g['groupName']}", g["template"]) for g in spec.get("workerGroupSpecs", [])]
    return templates


def pod_templates() -> Iterator[tuple[str, dict]]:
    """Every pod template in infra/, wherever it sits."""
    for where, doc in documents():
        kind, spec = doc["kind"], doc.get("spec", {})
        if kind in ("Deployment", "StatefulSet"):
            yield f"{where} {kind}", spec["template"]
        elif kind == "CronJob":
            yield f"{where} {kind}", spec["jobTemplate"]["spec"]["template"]
        elif kind == "RayJob" and "submitterPodTemplate" in spec:
            yield f"{where} RayJob submitter", spec["submitterPodTemplate"]
    for where, spec in ray_cluster_specs():
        for group, template in ray_pod_templates(spec):
            yield f"{where} Ray {group}", template


def containers(template: dict) -> list[dict]:
    pod = template["spec"]
    return pod.get("initContainers", []) + pod["containers"]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def command_lines() -> Iterator[tuple[str, str]]:
    """Shell text that may start a Python module: the files as written, every YAML
    string list (`command: [python, -m, x]`) joined, every JSON-form Dockerfile
    instruction (`CMD ["python", "-m", "x"]`) joined."""
    for path in text_paths():
        text = path.read_text()
        where = str(path.relative_to(ROOT))
        yield where, text
        for line in text.splitlines():
            form = re.match(r"\s*(?:CMD|ENTRYPOINT|RUN)\s+(\[.*\])\s*$", line)
            if form:
                yield where, " ".join(json.loads(form.group(1)))
    for where, doc in documents():
        for strings in _string_lists(doc):
            yield where, " ".join(strings)


def _string_lists(node) -> Iterator[list[str]]:
    if isinstance(node, dict):
        for value in node.values():
            yield from _string_lists(value)
    elif isinstance(node, list):
        if node and all(isinstance(item, str) for item in node):
            yield node
        for item in node:
            yield from _string_lists(item)


def project_packages() -> set[str]:
    """Top-level packages pyproject.toml installs (`include = ["dfcvae*", "pipeline*"]`)."""
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    return {pattern.rstrip("*").rstrip(".") for pattern in find["include"]}


def module_exists(module: str) -> bool:
    base = ROOT.joinpath(*module.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


# --- every manifest parses and names something that exists --------------------------


def test_infra_has_the_expected_files():
    for relative in [
        "docker/Dockerfile",
        "k8s/raycluster.yaml",
        "k8s/rayjob.yaml",
        "k8s/mlflow.yaml",
        "k8s/retrain-cronjob.yaml",
        "systemd/dfcvae-retrain.service",
        "systemd/dfcvae-retrain.timer",
        "README.md",
    ]:
        assert (INFRA / relative).is_file(), f"infra/{relative} is missing"


@pytest.mark.parametrize("path", yaml_paths(), ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_file_parses(path):
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert docs, f"{path} holds no YAML document"
    assert all(isinstance(doc, dict) for doc in docs), f"{path}: every document must be a mapping"


def test_every_document_has_api_version_kind_and_name():
    for where, doc in documents():
        assert doc.get("apiVersion"), f"{where}: a document without apiVersion"
        assert doc.get("kind"), f"{where}: a document without kind"
        assert (doc.get("metadata") or {}).get("name"), f"{where}: {doc['kind']} without metadata.name"


def test_every_python_module_named_in_infra_exists():
    packages = project_packages()
    named = {}
    for where, text in command_lines():
        for module in PYTHON_MODULE.findall(text):
            named.setdefault(module, where)
    ours = {module: where for module, where in named.items() if module.split(".")[0] in packages}
    # Guard against a pattern that silently matches nothing.
    assert {"pipeline.train", "pipeline.retrain"} <= set(ours), f"entrypoints found: {sorted(ours)}"
    missing = {module: where for module, where in ours.items() if not module_exists(module)}
    assert not missing, "infra/ names modules the repository does not have: " + ", ".join(
        f"{module} (in {where})" for module, where in sorted(missing.items())
    )


def test_kustomization_lists_existing_files_and_sets_every_image_placeholder():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    placeholders = {entry["name"] for entry in kustomization["images"]}
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), f"kustomization.yaml lists {resource}, which does not exist"
        for doc in yaml.safe_load_all((K8S / resource).read_text()):
            for image in _container_images(doc):
                assert image in placeholders or ":" in image, (
                    f"{resource}: image {image!r} has no tag and is not set by kustomization.yaml"
                )


def _container_images(node) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers"):
                yield from (container["image"] for container in value)
            yield from _container_images(value)
    elif isinstance(node, list):
        for item in node:
            yield from _container_images(item)


# --- the commands the project documents ----------------------------------------------


def test_rayjob_runs_the_documented_training_command():
    job = one("RayJob", "dfcvae-train")
    assert job["spec"]["entrypoint"] == "python -m pipeline.train"
    project_readme = ROOT / "README.md"
    if not project_readme.is_file():
        pytest.skip("README.md not written yet")
    assert job["spec"]["entrypoint"] in project_readme.read_text(), "README.md must document the RayJob's command"


def test_rayjob_runs_on_the_raycluster():
    job = one("RayJob", "dfcvae-train")
    selector = job["spec"]["clusterSelector"]
    assert one("RayCluster", selector["ray.io/cluster"])


def test_retraining_cronjob_launches_the_retrain_rayjob():
    cronjob = one("CronJob", "dfcvae-retrain")
    assert len(cronjob["spec"]["schedule"].split()) == 5
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]

    job = one("RayJob", "dfcvae-retrain")
    assert job["spec"]["entrypoint"] == "python -m pipeline.retrain"
    assert job["spec"]["shutdownAfterJobFinishes"] is True

    # The CronJob's service account may create and follow RayJobs.
    account = pod["serviceAccountName"]
    assert one("ServiceAccount", account)
    bindings = [
        b
        for _, b in objects("RoleBinding")
        if any(s["kind"] == "ServiceAccount" and s["name"] == account for s in b["subjects"])
    ]
    assert bindings, f"no RoleBinding for the ServiceAccount {account}"
    verbs = set()
    for binding in bindings:
        role = one(binding["roleRef"]["kind"], binding["roleRef"]["name"])
        for rule in role["rules"]:
            if "ray.io" in rule["apiGroups"] and "rayjobs" in rule["resources"]:
                verbs |= set(rule["verbs"])
    assert {"create", "get"} <= verbs, f"{account} may only {sorted(verbs)} RayJobs"

    # The launcher script and the RayJob template it creates come from the mounted ConfigMap.
    launcher = one("ConfigMap", "dfcvae-retrain")
    assert "rayjob.yaml" in launcher["data"] and "kubectl create" in launcher["data"]["launch.sh"]
    mounted = {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
    assert "dfcvae-retrain" in mounted


# Stands in for kubectl: records each call and answers as an API server would
# for a RayJob that ends with $STUB_JOB_STATUS.
STUB_KUBECTL = r"""#!/usr/bin/env bash
echo "$*" >> "$STUB_DIR/calls"
case "$*" in
  "get pod "*) echo registry.example.com/dfcvae:abc123 ;;
  "create -f -") cat > "$STUB_DIR/created.yaml" ;;
  *jobDeploymentStatus*) echo Complete ;;
  *jobStatus*) echo "$STUB_JOB_STATUS" ;;
esac
"""


@pytest.mark.parametrize(("job_status", "exit_code"), [("SUCCEEDED", 0), ("FAILED", 1)])
def test_retrain_launcher_creates_the_rayjob_with_its_own_image_and_reports_the_outcome(
    tmp_path, job_status, exit_code
):
    data = one("ConfigMap", "dfcvae-retrain")["data"]
    for name in ("launch.sh", "rayjob.yaml"):
        (tmp_path / name).write_text(data[name])
    stub = tmp_path / "bin" / "kubectl"
    stub.parent.mkdir()
    stub.write_text(STUB_KUBECTL)
    stub.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}",
        "POD_NAME": "dfcvae-retrain-29000000-abcde",
        "STUB_DIR": str(tmp_path),
        "STUB_JOB_STATUS": job_status,
    }
    run = subprocess.run(["bash", str(tmp_path / "launch.sh")], env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode == exit_code, run.stdout + run.stderr

    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0] == "get pod dfcvae-retrain-29000000-abcde -o jsonpath={.spec.containers[0].image}"
    assert calls[1].startswith("delete rayjob dfcvae-retrain ")
    created = yaml.safe_load((tmp_path / "created.yaml").read_text())
    assert created["kind"] == "RayJob" and created["spec"]["entrypoint"] == "python -m pipeline.retrain"
    images = set(_container_images(created))
    assert "registry.example.com/dfcvae:abc123" in images and "dfcvae" not in images


def test_retraining_head_gets_git_and_dvc_remote_from_secrets():
    head = ray_pod_templates(one("RayJob", "dfcvae-retrain")["spec"]["rayClusterSpec"])[0][1]
    checkout = next(c for c in head["spec"]["initContainers"] if c["name"] == "checkout")
    script = " ".join(checkout["command"] + checkout["args"])
    assert "git" in script and "clone" in script
    assert "dvc remote add --local" in script, "the DVC remote is configured in .dvc/config.local, never committed"
    from_secrets = {ref["secretRef"]["name"] for ref in checkout["envFrom"]}
    assert {"dfcvae-git", "dfcvae-dvc"} <= from_secrets
    ray_head = head["spec"]["containers"][0]
    assert ray_head["workingDir"].startswith("/workspace/"), "the driver must run in the clone"
    assert "dfcvae-git" in {ref["secretRef"]["name"] for ref in ray_head["envFrom"]}, (
        "pushing dvc.lock needs git credentials"
    )


def test_systemd_timer_starts_the_retraining_service():
    service = configparser.ConfigParser(interpolation=None)
    service.read(INFRA / "systemd" / "dfcvae-retrain.service")
    assert re.search(r"-m pipeline\.retrain\b", service["Service"]["ExecStart"])
    assert service["Service"]["Type"] == "oneshot"
    timer = configparser.ConfigParser(interpolation=None)
    timer.read(INFRA / "systemd" / "dfcvae-retrain.timer")
    assert timer["Timer"]["OnCalendar"]
    assert timer["Timer"]["Unit"] == "dfcvae-retrain.service"
    assert timer["Install"]["WantedBy"] == "timers.target"


def test_readme_documents_a_cron_line_and_token_auth():
    text = README.read_text()
    cron_lines = [line for line in text.splitlines() if re.match(r"^(\S+\s+){5}.*-m pipeline\.retrain", line)]
    assert cron_lines, "infra/README.md must give a crontab line for python -m pipeline.retrain"
    assert "RAY_AUTH_MODE=token" in text


# --- nothing exposed, everything authenticated ---------------------------------------


def test_no_service_is_exposed_outside_the_cluster():
    assert not objects("Ingress"), "no Ingress: MLflow and the Ray dashboard stay inside the cluster"
    for where, service in objects("Service"):
        kind = service["spec"].get("type", "ClusterIP")
        assert kind == "ClusterIP", f"{where}: Service {service['metadata']['name']} is {kind}"
    for where, spec in ray_cluster_specs():
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: the Ray head Service must be ClusterIP"
        assert not head.get("enableIngress", False), f"{where}: no Ingress for the Ray dashboard"
    for where, template in pod_templates():
        assert not template["spec"].get("hostNetwork"), f"{where}: hostNetwork"
        for container in containers(template):
            assert all("hostPort" not in port for port in container.get("ports", [])), f"{where}: hostPort"


def _mlflow_container() -> dict:
    deployment = one("Deployment", "dfcvae-mlflow")
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "mlflow")


def test_mlflow_server_runs_basic_auth_on_postgres_and_s3():
    container = _mlflow_container()
    argv = container.get("command", []) + container.get("args", [])
    command = " ".join(argv)
    assert command.startswith("mlflow server")
    assert re.search(r"--app-name[ =]basic-auth\b", command)
    assert re.search(r"--backend-store-uri[ =]postgresql", command)
    assert re.search(r"--artifacts-destination[ =]s3://", command)
    env = env_of(container)
    assert "MLFLOW_S3_ENDPOINT_URL" in env
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert "secretKeyRef" in env[name].get("valueFrom", {}), f"{name} must come from a Secret"

    # The auth config MLflow reads is the mounted ConfigMap, and it carries no password.
    config_path = Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    volumes = one("Deployment", "dfcvae-mlflow")["spec"]["template"]["spec"]["volumes"]
    config_map = next(v["configMap"]["name"] for v in volumes if v["name"] == mount["name"])
    ini = configparser.ConfigParser(interpolation=None)
    ini.read_string(one("ConfigMap", config_map)["data"][config_path.name])
    assert "admin_password" not in ini["mlflow"], "the admin password comes from the environment, not the file"
    assert ini["mlflow"]["database_uri"].startswith("postgresql")


def test_mlflow_and_postgres_admit_only_this_namespace():
    policies = [p for _, p in objects("NetworkPolicy")]
    labels = {
        "mlflow": one("Deployment", "dfcvae-mlflow")["spec"]["template"]["metadata"]["labels"],
        "postgres": one("StatefulSet", "dfcvae-postgres")["spec"]["template"]["metadata"]["labels"],
    }
    for name, pod_labels in labels.items():
        selecting = [p for p in policies if p["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()]
        assert selecting, f"no NetworkPolicy selects the {name} pods"
        for policy in selecting:
            for rule in policy["spec"]["ingress"]:
                for peer in rule["from"]:
                    # A podSelector alone matches pods of the policy's own namespace.
                    assert peer.keys() == {"podSelector"}, f"{policy['metadata']['name']} admits {peer}"


def test_ray_pods_admit_any_port_only_from_ray_pods_and_the_job_api_from_this_namespace_and_the_operator():
    """Between Ray pods run unauthenticated ports picked at run time (torch.distributed's store,
    gloo, NCCL): only Ray pods reach them; anything else gets the job API (8265) at most."""
    head_labels = one("RayCluster", "dfcvae")["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    policies = [p for _, p in objects("NetworkPolicy")]
    selecting = [p for p in policies if p["spec"]["podSelector"]["matchLabels"].items() <= head_labels.items()]
    assert selecting, "no NetworkPolicy selects the Ray pods"
    for policy in selecting:
        for rule in policy["spec"]["ingress"]:
            for peer in rule["from"]:
                ray_pods = peer.keys() == {"podSelector"} and peer["podSelector"].get("matchLabels", {}).items() <= {
                    ("app.kubernetes.io/name", "ray")
                }
                if ray_pods and peer["podSelector"].get("matchLabels"):
                    continue  # other Ray pods: any port
                if peer.keys() == {"namespaceSelector"}:  # the KubeRay operator's namespace
                    assert "kubernetes.io/metadata.name" in peer["namespaceSelector"]["matchLabels"]
                else:
                    assert peer.keys() == {"podSelector"}, f"{policy['metadata']['name']} admits {peer}"
                assert [port["port"] for port in rule.get("ports", [])] == [8265], (
                    f"{policy['metadata']['name']} admits {peer} on more than the job API"
                )


def test_no_default_password_and_no_literal_credentials():
    for path in text_paths():
        assert DEFAULT_MLFLOW_PASSWORD not in path.read_text(), f"{path} contains MLflow's old default password"
    for where, template in pod_templates():
        for container in containers(template):
            for name, var in env_of(container).items():
                if SECRET_ENV.search(name):
                    assert "value" not in var, f"{where}: {name} is written inline; take it from a Secret"


def test_ray_pods_use_token_auth_from_a_secret():
    specs = ray_cluster_specs()
    assert specs
    for where, spec in specs:
        assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: authOptions.mode must be token"
        groups = ray_pod_templates(spec)
        assert any(
            "nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for _, t in groups[1:] for c in containers(t)
        ), f"{where}: no worker group requests nvidia.com/gpu"
        ray_containers = [(g, c) for g, t in groups for c in t["spec"]["containers"]]
        ray_containers += [("autoscaler", spec["autoscalerOptions"])] if spec.get("enableInTreeAutoscaling") else []
        for group, container in ray_containers:
            _assert_token_env(f"{where} {group}", container)
    for where, job in objects("RayJob"):
        for container in job["spec"]["submitterPodTemplate"]["spec"]["containers"]:
            _assert_token_env(f"{where} submitter", container)


def _assert_token_env(where: str, container: dict) -> None:
    env = env_of(container)
    assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE=token is not set"
    assert "secretKeyRef" in env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}), (
        f"{where}: RAY_AUTH_TOKEN must come from a Secret"
    )


def test_every_secret_used_is_created_in_the_readme():
    created = {}
    for command in README.read_text().replace("\\\n", " ").splitlines():
        name = re.search(r"create secret generic (\S+)", command)
        if name:
            created[name.group(1)] = set(re.findall(r"--from-literal=([^\s=]+)=", command))
    used: dict[str, set[str]] = {}
    for _, template in pod_templates():
        for container in containers(template):
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    used.setdefault(ref["name"], set()).add(ref["key"])
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    used.setdefault(source["secretRef"]["name"], set())
    for _, spec in ray_cluster_specs():
        used.setdefault(spec["authOptions"]["secretName"], set()).add("auth_token")
    for name, keys in used.items():
        assert name in created, f"Secret {name} is used but infra/README.md does not show how to create it"
        assert keys <= created[name], (
            f"Secret {name}: README creates {sorted(created[name])}, manifests read {sorted(keys)}"
        )


# --- images --------------------------------------------------------------------------


def _pinned(package: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d.split("==")[1] for d in deps if re.split(r"[\[=]", d)[0] == package)


def test_ray_version_matches_the_pin_everywhere():
    ray = _pinned("ray")
    for where, spec in ray_cluster_specs():
        assert spec["rayVersion"] == ray, f"{where}: rayVersion {spec['rayVersion']} but pyproject pins ray {ray}"
    for path in text_paths():
        for tag in re.findall(r"rayproject/ray:([0-9][\w.]*)", path.read_text()):
            assert tag == ray, f"{path}: rayproject/ray:{tag} but pyproject pins ray {ray}"


@pytest.mark.parametrize("path", sorted(INFRA.glob("docker/*Dockerfile")), ids=lambda p: p.name)
def test_dockerfile_runs_as_non_root_from_a_pinned_base(path):
    lines = path.read_text().splitlines()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", path.read_text(), re.MULTILINE))
    bases = [
        re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], line.split()[1])
        for line in lines
        if line.startswith("FROM ")
    ]
    assert bases and all(":" in b and not b.endswith(":latest") for b in bases), f"{path}: base images {bases}"
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"{path} must end as a non-root user"


def test_training_image_installs_the_project():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert re.search(r"pip install -e \.", text)
    assert "download.pytorch.org/whl/cu13" in text, "torch comes from the CUDA 13 wheel index"


# --- schemas -------------------------------------------------------------------------


def test_structure_of_workloads_services_and_ray_resources():
    """What a schema would catch, checked without one."""
    volumes_ok = {"configMap", "secret", "emptyDir", "ephemeral", "persistentVolumeClaim", "downwardAPI", "projected"}
    claims = {
        c["metadata"]["name"] for _, s in objects("StatefulSet") for c in s["spec"].get("volumeClaimTemplates", [])
    }
    for where, template in pod_templates():
        pod = template["spec"]
        declared = {v["name"] for v in pod.get("volumes", [])} | (claims if "StatefulSet" in where else set())
        for volume in pod.get("volumes", []):
            assert volumes_ok & volume.keys(), f"{where}: volume {volume['name']} of an unexpected type"
        for container in containers(template):
            assert container.get("name") and container.get("image"), f"{where}: a container without name or image"
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in declared, f"{where}: mounts undeclared volume {mount['name']}"
            for var in container.get("env", []):
                assert ("value" in var) != ("valueFrom" in var), f"{where}: env {var['name']} needs value or valueFrom"
            limits = container.get("resources", {}).get("limits", {})
            requests = container.get("resources", {}).get("requests", {})
            assert limits or requests, f"{where}: container {container['name']} has no resources"

    for kind in ("Deployment", "StatefulSet"):
        for where, doc in objects(kind):
            selector = doc["spec"]["selector"]["matchLabels"]
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), f"{where}: selector does not match the pod labels"
    for _, statefulset in objects("StatefulSet"):
        assert one("Service", statefulset["spec"]["serviceName"])

    pod_labels = [t.get("metadata", {}).get("labels", {}) for _, t in pod_templates()]
    for where, service in objects("Service"):
        selector = service["spec"]["selector"]
        assert any(selector.items() <= labels.items() for labels in pod_labels), (
            f"{where}: Service {service['metadata']['name']} selects no pod"
        )
        assert all("port" in port for port in service["spec"]["ports"])

    for where, spec in ray_cluster_specs():
        assert isinstance(spec["headGroupSpec"]["rayStartParams"], dict), f"{where}: head rayStartParams"
        for group in spec["workerGroupSpecs"]:
            assert group["groupName"] and isinstance(group["rayStartParams"], dict)
            assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], (
                f"{where}: {group['groupName']} replicas"
            )
    for where, job in objects("RayJob"):
        spec = job["spec"]
        assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].strip()
        assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), (
            f"{where}: rayClusterSpec or clusterSelector, not both"
        )

    for _, binding in objects("RoleBinding"):
        assert one(binding["roleRef"]["kind"], binding["roleRef"]["name"])
        for subject in binding["subjects"]:
            assert one(subject["kind"], subject["name"])


BUILT_IN = {
    "Namespace", "ConfigMap", "Service", "Deployment", "StatefulSet", "CronJob",
    "ServiceAccount", "Role", "RoleBinding", "NetworkPolicy",
}  # fmt: skip


def test_against_the_kubernetes_schemas():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    from kubernetes_validate.utils import latest_version

    version = latest_version()
    checked = []
    for where, doc in documents():
        if doc["kind"] in BUILT_IN:
            kubernetes_validate.validate(doc, version, strict=True)
            checked.append(where)
    # KubeRay's CRDs are not in those schemas; their pod templates are core PodTemplateSpecs.
    for where, template in pod_templates():
        if "Ray" in where:
            wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
            kubernetes_validate.validate(wrapper, version, strict=True)
            checked.append(where)
    assert checked
