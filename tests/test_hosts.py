"""Training across a real network: hosts in network namespaces (tests/hosts.py), Ray in cluster mode.

Host A runs the Ray head and the driver (`python -m pipeline.train`), host B a worker node, host C
the S3-compatible store (moto) and the MLflow tracking server whose artifacts go to it; host D joins
as the replacement when B's cable is pulled. Every process runs inside its host and reaches the
others only at their addresses, through the switch; credentials come from the environment, as on
a cluster. Each of A, B and D offers one `trainer_slot`, and each of the two training workers needs
one, so the ranks run on two hosts.

Ray's GCS declares a node dead after health_check_failure_threshold checks, health_check_period_ms
apart, have each failed or waited health_check_timeout_ms (RAY_<name> on the head). Ray's defaults
(3000 ms, 10000 ms, 5) take up to a minute; the head here uses 1000, 1000 and 3.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from dfcvae.checkpoint import load_checkpoint
from dfcvae.config import Config
from tests import hosts
from tests.conftest import ROOT, tiny_config, wait_until

WHY_NOT = hosts.unavailable()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(WHY_NOT is not None, reason=f"no network namespaces here: {WHY_NOT}"),
]

BUCKET = "dfcvae-hosts"
SLOT = "trainer_slot"
S3_PORT, MLFLOW_PORT, RAY_PORT = 9000, 5000, 6379
HEALTH_CHECKS = {  # the head's: a node is dead within about 3 s of its last answer
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


@pytest.fixture(scope="module")
def network():
    net = hosts.Network(["a", "b", "c", "d", "o"])
    yield net
    net.close()


@pytest.fixture(scope="module")
def plain_env(network) -> dict[str, str]:
    """What every process on every host gets, credentials aside: the store's and the tracking
    server's addresses, the cluster's token mode."""
    storage = network["c"].address
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_", "AWS_"))}
    return base | {
        "PATH": f"{Path(sys.executable).parent}:{base['PATH']}",
        "PYTHONPATH": str(ROOT),
        "RAY_AUTH_MODE": "token",
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{storage}:{S3_PORT}",
        "MLFLOW_S3_ENDPOINT_URL": f"http://{storage}:{S3_PORT}",
        "MLFLOW_TRACKING_URI": f"http://{storage}:{MLFLOW_PORT}",
    }


@pytest.fixture(scope="module")
def env(plain_env, storage) -> dict[str, str]:
    """What the cluster's processes get: plain_env and the credentials (the bucket's keys, an
    MLflow account)."""
    return plain_env | storage["credentials"]


def python(host: hosts.Host, code: str, env: dict[str, str], timeout: float = 120) -> str:
    return host.run([sys.executable, "-c", code], env, timeout)


def answers(host: hosts.Host, url: str, env: dict[str, str]) -> bool:
    """Whether `url` answers an HTTP request made from `host`."""
    code = f"import urllib.request as u\ntry: u.urlopen({url!r}, timeout=3)\nexcept u.HTTPError: pass"
    try:
        python(host, code, env, timeout=20)
        return True
    except AssertionError:
        return False


@pytest.fixture(scope="module")
def storage(network, plain_env, synthetic_cfg, tmp_path_factory) -> dict:
    """On host C: the bucket with the shards, which then takes only an IAM user's keys, and the
    tracking server behind MLflow's basic-auth app; -> {"shards": their URL, "credentials": env}."""
    c, a = network["c"], network["a"]
    logs = tmp_path_factory.mktemp("storage")
    endpoint = plain_env["AWS_ENDPOINT_URL"]
    s3 = c.start([sys.executable, "-m", "moto.server", "-H", c.address, "-p", str(S3_PORT)], plain_env, logs / "s3.log")
    ready = f"{endpoint}/moto-api/data.json"  # moto's own API: not an S3 request
    wait_until(lambda: answers(a, ready, plain_env), "the store on host C", process=s3, log=logs / "s3.log")
    shards = str(synthetic_cfg.data.shards_dir) + "/"
    setup = f"""import boto3, fsspec, json, urllib.request
iam = boto3.client("iam")
iam.create_user(UserName="dfcvae")
key = iam.create_access_key(UserName="dfcvae")["AccessKey"]
policy = {{"Version": "2012-10-17", "Statement": [{{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}}]}}
iam.put_user_policy(UserName="dfcvae", PolicyName="bucket", PolicyDocument=json.dumps(policy))
boto3.client("s3").create_bucket(Bucket={BUCKET!r})
fsspec.filesystem("s3").put({shards!r}, {BUCKET + "/shards/"!r}, recursive=True)
# From here on moto checks every request's signature and the IAM user's policy.
reset = {endpoint + "/moto-api/reset-auth"!r}
urllib.request.urlopen(urllib.request.Request(reset, data=b"0", headers={{"Content-Type": "text/plain"}}))
print("keys:", json.dumps({{"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}}))
"""
    unsigned = {"AWS_ACCESS_KEY_ID": "setup", "AWS_SECRET_ACCESS_KEY": "setup"}  # before auth is on
    out = python(c, setup, plain_env | unsigned)
    keys = json.loads(next(line for line in out.splitlines() if line.startswith("keys: ")).removeprefix("keys: "))
    account = {"MLFLOW_TRACKING_USERNAME": "dfcvae", "MLFLOW_TRACKING_PASSWORD": secrets.token_urlsafe(16)}
    (logs / "basic_auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{logs / 'auth.db'}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    server_env = (
        plain_env
        | keys
        | {
            "MLFLOW_AUTH_CONFIG_PATH": str(logs / "basic_auth.ini"),
            "MLFLOW_AUTH_ADMIN_USERNAME": account["MLFLOW_TRACKING_USERNAME"],
            "MLFLOW_AUTH_ADMIN_PASSWORD": account["MLFLOW_TRACKING_PASSWORD"],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        }
    )
    server = c.start(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--app-name",
            "basic-auth",
            "--host",
            c.address,
            "--port",
            str(MLFLOW_PORT),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{logs / 'mlflow.db'}",
            "--artifacts-destination",
            f"s3://{BUCKET}/mlflow",
        ],
        server_env,
        logs / "mlflow.log",
    )
    health = f"{plain_env['MLFLOW_TRACKING_URI']}/health"
    server_log = logs / "mlflow.log"
    wait_until(lambda: answers(a, health, plain_env), "the tracking server on host C", process=server, log=server_log)
    return {"shards": f"s3://{BUCKET}/shards", "credentials": keys | account}


def start_node(host: hosts.Host, env: dict[str, str], log: Path, head: hosts.Host | None = None):
    """A Ray node on `host` with one trainer slot: the head when `head` is None, else joining it."""
    where = ["--head", "--port", str(RAY_PORT), "--dashboard-host", host.address]
    if head is not None:
        where = ["--address", f"{head.address}:{RAY_PORT}"]
    return host.start(
        [
            "ray",
            "start",
            "--block",
            *where,
            "--node-ip-address",
            host.address,
            "--num-cpus",
            "1",
            "--resources",
            json.dumps({SLOT: 1}),
            "--disable-usage-stats",
            "--temp-dir",
            str(host.scratch),  # sockets live here: short, one per host
        ],
        env | (HEALTH_CHECKS if head is None else {}),
        log,
    )


def alive_nodes(head: hosts.Host, env: dict[str, str]) -> dict[str, str]:
    """Node id -> address of every node the head's GCS holds alive, asked from `head`."""
    code = (
        f"import json, ray\nray.init(address='{head.address}:{RAY_PORT}', logging_level='ERROR', log_to_driver=False)\n"
        "print('nodes:', json.dumps({n['NodeID']: n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']}))"
    )
    (line,) = [line for line in python(head, code, env).splitlines() if line.startswith("nodes: ")]
    return json.loads(line.removeprefix("nodes: "))


@pytest.fixture(scope="module")
def cluster(network, env, storage, tmp_path_factory) -> dict[str, hosts.Host]:
    """The head on A and a worker node on B."""
    a, b = network["a"], network["b"]
    logs = tmp_path_factory.mktemp("ray")
    head = start_node(a, env, logs / "a.log")
    wait_until(lambda: answers(a, f"http://{a.address}:8265/api/version", env), "Ray's head on A", process=head)
    worker = start_node(b, env, logs / "b.log", head=a)
    wait_until(lambda: len(alive_nodes(a, env)) == 2, "host B's node in the cluster", process=worker)
    return {"a": a, "b": b}


def drive(host: hosts.Host, params: Path, env: dict[str, str], log: Path):
    """The train stage's command on `host`, joining the cluster whose head is there."""
    command = [sys.executable, "-m", "pipeline.train", "--params", str(params)]
    return host.start(command, env | {"RAY_ADDRESS": f"{host.address}:{RAY_PORT}"}, log)


def run_config(tmp: Path, shards: str, storage: str, **overrides) -> Path:
    """A params file for two workers, one per host, shards and checkpoints in the bucket."""
    cfg: Config = tiny_config(
        tmp,
        **{
            "data.shards_dir": shards,
            "scaling.num_workers": 2,
            "scaling.cpus_per_worker": 0.5,
            "scaling.worker_resources": {SLOT: 1},
            "scaling.placement_strategy": "SPREAD",
            "scaling.storage_dir": f"s3://{BUCKET}/{storage}",
            "scaling.node_wait_s": 120,
            "scaling.max_failures": 2,
            "train.steps": 24,
            "train.log_every": 4,
            "train.val_every": 24,
            "train.val_batches": 1,
            "train.checkpoint_every": 4,
            "train.grid_every": 24,
            "train.system_metrics_s": 0,
            "optim.lr": 2e-3,
            **overrides,
        },
    )
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def reports(params: Path) -> list[dict]:
    out = Path(yaml.safe_load(params.read_text())["train"]["out_dir"])
    for folder in (Path(f"{out}.partial"), out):
        if (folder / "reports.jsonl").is_file():
            return [json.loads(line) for line in (folder / "reports.jsonl").read_text().splitlines()]
    return []


def said(log: Path) -> str:
    """The command's one-line verdict (`train: ...`) in its output, among the cluster's forwarded logs."""
    lines = [line for line in log.read_text().splitlines() if line.startswith("train: ")]
    assert len(lines) == 1, log.read_text()[-4000:]
    return lines[0]


def bucket_keys(network, env, prefix: str) -> list[str]:
    code = (
        f"import json, boto3\npages = boto3.client('s3').get_paginator('list_objects_v2').paginate("
        f"Bucket={BUCKET!r}, Prefix={prefix!r})\n"
        "print(json.dumps([i['Key'] for p in pages for i in p.get('Contents', [])]))"
    )
    return json.loads(python(network["c"], code, env).strip().splitlines()[-1])


@pytest.fixture(scope="module")
def uninterrupted(cluster, env, storage, tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    """The run on A and B, the driver on A; -> its params file, and the addresses that A and B
    listened on meanwhile."""
    tmp = tmp_path_factory.mktemp("whole")
    params = run_config(tmp, storage["shards"], "ray-whole")
    driver = drive(cluster["a"], params, env, tmp / "driver.log")
    listening: set[str] = set()
    while driver.poll() is None:
        listening |= {address for host in cluster.values() for address, _ in host.listening()}
        time.sleep(0.5)
    assert driver.returncode == 0, (tmp / "driver.log").read_text()[-4000:]
    return params, listening


def test_a_local_checkpoint_path_on_hosts_that_do_not_share_it_is_refused(cluster, env, storage, tmp_path):
    params = run_config(tmp_path, storage["shards"], "unused", **{"scaling.storage_dir": str(tmp_path / "ray")})
    log = tmp_path / "driver.log"
    driver = drive(cluster["a"], params, env, log)
    driver.wait(timeout=300)
    assert driver.returncode == 1
    assert "does not survive that node" in said(log)
    assert not (tmp_path / "ray").exists()


def admitted_to_outsiders(manifest: str, policy: str) -> set[int]:
    """The ports `policy` (a NetworkPolicy in infra/k8s/`manifest`) admits from pods that are not
    its own kind: the ingress rules with ports whose `from` is not the policy's own pod selector."""
    docs = yaml.safe_load_all((ROOT / "infra" / "k8s" / manifest).read_text())
    (spec,) = [d["spec"] for d in docs if d and d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == policy]
    own = {"podSelector": spec["podSelector"]}
    return {port["port"] for rule in spec["ingress"] if own not in rule["from"] for port in rule.get("ports", [])}


def reachable(outsider: hosts.Host, host: hosts.Host, env: dict[str, str]) -> list[int]:
    """The ports `host` listens on (any address) that `outsider` can open a connection to."""
    ports = sorted({int(address.rpartition(":")[2]) for address, _ in host.listening()})
    code = f"""import json, socket
found = []
for port in {ports}:
    with socket.socket() as s:
        s.settimeout(1)
        if s.connect_ex(({host.address!r}, port)) == 0:
            found.append(port)
print("open:", json.dumps(found))
"""
    out = python(outsider, code, env)
    return json.loads(next(line for line in out.splitlines() if line.startswith("open: ")).removeprefix("open: "))


def status(outsider: hosts.Host, url: str, env: dict[str, str], body: dict | None = None) -> int:
    """The HTTP status `url` answers `outsider`'s request (a POST of `body` as JSON when given)
    without credentials with."""
    data = None if body is None else json.dumps(body).encode()
    code = f"""import urllib.request as u
request = u.Request({url!r}, data={data!r}, headers={{"Content-Type": "application/json"}})
try:
    print("status:", u.urlopen(request, timeout=5).status)
except u.HTTPError as err:
    print("status:", err.code)
"""
    out = python(outsider, code, env)
    return int(next(line for line in out.splitlines() if line.startswith("status: ")).removeprefix("status: "))


def test_an_outsider_on_the_network_is_refused_by_every_service_the_policies_admit_it_to(
    cluster, network, plain_env, storage, tmp_path
):
    """Host O shares the network but not the cluster's credentials (plain_env: no token, no MLflow
    account, no bucket keys)."""
    o, a, b, c = network["o"], network["a"], network["b"], network["c"]
    seen = {host.name: reachable(o, host, plain_env) for host in (a, b, c)}
    (tmp_path / "reachable.json").write_text(json.dumps(seen, indent=1))
    print("ports an outsider reaches:", {name.rpartition("-")[2]: ports for name, ports in seen.items()})
    # What infra/k8s's NetworkPolicies let a pod that is not a Ray pod reach: Ray's job API on the
    # head, and the tracking server. Both are there, and both refuse a request without credentials.
    ray_ports = admitted_to_outsiders("raycluster.yaml", "dfcvae-ray")
    mlflow_ports = admitted_to_outsiders("mlflow.yaml", "dfcvae-mlflow")
    assert ray_ports == {8265} and mlflow_ports == {MLFLOW_PORT}
    assert ray_ports <= set(seen[a.name]) and mlflow_ports <= set(seen[c.name])
    job = {"entrypoint": "python -m pipeline.train"}  # `ray job submit` without the token
    assert status(o, f"http://{a.address}:8265/api/jobs/", plain_env, job) in (401, 403)
    experiments = f"{plain_env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search?max_results=1"
    assert status(o, experiments, plain_env) == 401  # no MLflow account
    # The bucket: unsigned, and signed with keys it does not know.
    unsigned = status(o, f"{plain_env['AWS_ENDPOINT_URL']}/{BUCKET}", plain_env)
    assert unsigned in (403, 500)  # S3 answers 403 AccessDenied; moto, whose auth is basic, fails with 500
    code = f"""import boto3, botocore
try:
    boto3.client("s3").list_objects_v2(Bucket={BUCKET!r})
    print("listed")
except botocore.exceptions.ClientError as err:
    print("refused:", err.response["Error"]["Code"])
"""
    guessed = {"AWS_ACCESS_KEY_ID": "AKIAGUESSED", "AWS_SECRET_ACCESS_KEY": "guessed"}
    assert python(o, code, plain_env | guessed).strip().splitlines()[-1] == "refused: InvalidAccessKeyId"
    # The scan does see ports the policy closes to outsiders: Ray's own, admitted from Ray pods only
    # (docs/scaling.md lists them), the GCS among them.
    assert RAY_PORT in seen[a.name], seen


def test_two_hosts_train_from_and_into_the_bucket_over_the_network(uninterrupted, network, env):
    params, listening = uninterrupted
    a, b = network["a"], network["b"]
    rows = reports(params)
    steps = yaml.safe_load(params.read_text())["train"]["steps"]
    last = [r for r in rows if r["step"] == steps]
    assert sorted(r["rank"] for r in last) == [0, 1]
    assert {r["node_address"] for r in last} == {a.address, b.address}, "the ranks did not run on hosts A and B"
    assert len({r["weights_sha256"] for r in last}) == 1, "the ranks' VAE weights differ"
    # Cluster mode: the rendezvous store listens on its node's address, not on every interface,
    # and gloo's sockets use the interface that holds it.
    (rank0,) = [r for r in last if r["rank"] == 0]
    assert rank0["store"].rpartition(":")[0] == rank0["node_address"]
    assert rank0["store"] in listening, (rank0["store"], sorted(listening))
    port = rank0["store"].rpartition(":")[2]
    assert not {f"*:{port}", f"0.0.0.0:{port}", f"[::]:{port}"} & listening, "the store listens on every interface"
    assert all(r["store"] is None for r in last if r["rank"] != 0)
    assert {r["socket_ifname"] for r in last} == {"eth0"}
    assert any(key.endswith("checkpoint.pt") for key in bucket_keys(network, env, "ray-whole/"))
    out = Path(yaml.safe_load(params.read_text())["train"]["out_dir"])
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    stored = bucket_keys(network, env, "mlflow/")
    assert any(key.endswith(f"{run_id}/artifacts/metrics.json") for key in stored), stored[:20]


def test_two_hosts_shard_photographs_from_the_bucket_into_the_bucket(cluster, network, env, storage, tmp_path):
    """The data stages on the cluster: fetch on A lists and hashes photographs in the bucket on C;
    shard's Ray tasks on A and B read them from there and write their shards straight back."""
    from tests.test_prep import _folder

    photos = _folder(tmp_path / "photos", {"train": 12, "val": 3, "test": 3})
    upload = (
        "import boto3, pathlib\n"
        f"root = pathlib.Path({str(photos)!r})\n"
        "for p in sorted(root.rglob('*.jpg')):\n"
        "    key = 'photos/' + p.relative_to(root).as_posix()\n"
        f"    boto3.client('s3').put_object(Bucket={BUCKET!r}, Key=key, Body=p.read_bytes())\n"
    )
    python(network["c"], upload, env)
    cfg = tiny_config(
        tmp_path,
        **{
            "data.source": "folder",
            "data.folder_dir": f"s3://{BUCKET}/photos",
            "data.shards_dir": f"s3://{BUCKET}/prepared",
            "data.crop_size": "square",
            "data.samples_per_shard": 3,
            "shard.engine": "ray",
            "shard.workers": 2,
        },
    )
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(cfg.to_dict()))
    a = cluster["a"]
    ray_env = env | {"RAY_ADDRESS": f"{a.address}:{RAY_PORT}"}
    a.run([sys.executable, "-m", "pipeline.fetch", "--params", str(params)], ray_env)
    log = tmp_path / "shard.log"
    stage = a.start([sys.executable, "-m", "pipeline.shard", "--params", str(params)], ray_env, log)
    assert stage.wait(timeout=300) == 0, log.read_text()[-4000:]
    (line,) = [line for line in log.read_text().splitlines() if line.startswith("shard: 6 shards written")]
    assert "on 2 nodes" in line and a.address in line and network["b"].address in line, line
    keys = bucket_keys(network, env, "prepared")
    assert sorted(k.removeprefix("prepared/") for k in keys if not k.endswith(".tar")) == [
        "manifest.json",
        "manifest.sha256",
        "report.json",
    ]
    assert sum(k.endswith(".tar") for k in keys) == 6 and not bucket_keys(network, env, "prepared.partial")


def test_a_host_cut_off_mid_run_is_declared_dead_and_the_run_ends_on_a_replacement(
    uninterrupted, cluster, network, env, storage, tmp_path
):
    a, b, d = network["a"], network["b"], network["d"]
    params = run_config(tmp_path, storage["shards"], "ray-cut")  # the same run in its own storage
    driver = drive(a, params, env, tmp_path / "driver.log")
    wait_until(
        lambda: any(r["step"] >= 8 and r["node_address"] == b.address for r in reports(params)),
        "a checkpoint at step 8 with a rank on host B",
        process=driver,
        log=tmp_path / "driver.log",
    )
    cut_after = max(r["step"] for r in reports(params))
    steps = yaml.safe_load(params.read_text())["train"]["steps"]
    assert cut_after < steps, f"the run ended (step {cut_after}) before the cable could be pulled"
    b.cable(plugged=False)
    cut = time.monotonic()
    try:
        wait_until(lambda: b.address not in alive_nodes(a, env).values(), "host B declared dead", process=driver)
        detected = time.monotonic() - cut
        start_node(d, env, tmp_path / "d.log", head=a)  # the replacement, as an autoscaler would add it
        wait_until(lambda: driver.poll() is not None, "the run's end", process=None)
        ended = time.monotonic() - cut
    finally:
        b.cable(plugged=True)
    assert driver.returncode == 0, (tmp_path / "driver.log").read_text()[-4000:]
    print(f"cut after step {cut_after}: B declared dead in {detected:.1f} s, the run ended {ended:.0f} s after the cut")
    rows = reports(params)
    resumed = [r for r in rows if r["restored_from"] > 0]
    assert resumed, "no rank resumed from a checkpoint"
    last = [r for r in rows if r["step"] == steps]
    assert {r["node_address"] for r in last} == {a.address, d.address}
    assert all(r["samples_seen"] == rows[-1]["samples_seen"] for r in last)
    whole, _ = uninterrupted
    assert last[0]["samples_seen"] == next(r for r in reports(whole) if r["step"] == steps)["samples_seen"]
    reference = load_checkpoint(Path(yaml.safe_load(whole.read_text())["train"]["out_dir"]) / "model.pt")["model"]
    resumed_model = load_checkpoint(Path(yaml.safe_load(params.read_text())["train"]["out_dir"]) / "model.pt")["model"]
    for key, value in reference.items():
        assert torch.allclose(value.float(), resumed_model[key].float(), atol=1e-6), key


def test_without_a_replacement_a_cut_off_run_ends_after_node_wait_s_in_one_sentence(
    uninterrupted, cluster, network, env, storage, tmp_path
):
    a, b, d = network["a"], network["b"], network["d"]
    # One worker host besides A, so that losing it leaves no free slot: B when this test runs
    # alone, D after the test above replaced B with it.
    if not {b.address, d.address} & set(alive_nodes(a, env).values()):
        start_node(d, env, tmp_path / "d.log", head=a)
        wait_until(lambda: d.address in alive_nodes(a, env).values(), "host D's node in the cluster")
    params = run_config(tmp_path, storage["shards"], "ray-alone", **{"scaling.node_wait_s": 10})
    log = tmp_path / "driver.log"
    driver = drive(a, params, env, log)

    def other_host() -> hosts.Host | None:
        """The host of the rank that is not on A, once it has reported step 8."""
        ranks = [r for r in reports(params) if r["step"] >= 8 and r["node_address"] != a.address]
        return next((h for h in (b, d) if ranks and h.address == ranks[-1]["node_address"]), None)

    wait_until(lambda: other_host() is not None, "step 8 with a rank off host A", process=driver, log=log)
    victim = other_host()
    victim.cable(plugged=False)
    cut = time.monotonic()
    try:
        wait_until(lambda: driver.poll() is not None, "the run's end")
    finally:
        victim.cable(plugged=True)
    print(f"the run without a replacement ended {time.monotonic() - cut:.0f} s after the cut")
    assert driver.returncode == 1
    sentence = said(log)
    assert sentence.startswith("train: no nodes for 2 workers") and "scaling.node_wait_s=10 s" in sentence, sentence
