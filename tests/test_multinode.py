"""Placement across nodes: each rank's bundle goes where its `placement` says.

The bundle layout is pure (unit tests on ``Cluster._bundles``). The cluster test runs a real
three-node Ray cluster on this machine: `ray start --head` and two `ray start --address` worker
processes, each declaring its own custom resource (and one a node label), then `ray job submit`s
the recipe with two SFT ranks pinned to different nodes and reads where the actors ran.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from rayalign.cluster.runtime import Cluster
from rayalign.config import ResourcesConfig, RoleResources, RolloutResources, load_config
from rayalign.errors import ConfigError

from conftest import REPO

BIN = Path(sys.executable).parent


def test_tensor_parallel_engine_keeps_its_gpus_in_one_bundle():
    cluster = Cluster(ResourcesConfig(rollout=RolloutResources(num_workers=2, num_gpus=1, tensor_parallel_size=4)))
    bundles, selectors, placements = cluster._bundles([cluster.role("rollout")])
    # One bundle per engine holding all 4 of its GPUs: a bundle never spans nodes.
    assert bundles == [{"CPU": 1, "GPU": 4}, {"CPU": 1, "GPU": 4}]
    assert selectors == [{}, {}]
    assert placements["rollout"].bundles == [0, 1] and placements["rollout"].num_gpus == 4


def test_each_rank_gets_its_own_node_constraint():
    resources = ResourcesConfig(
        trainer=RoleResources(num_workers=2, num_gpus=1, placement=[{"resources": {"node_a": 0.01}},
                                                                     {"labels": {"pool": "b"}}]),
        reference=RoleResources(num_gpus=1, placement=[{"resources": {"ref_pool": 1}, "labels": {"zone": "!z1"}}]),
    )
    cluster = Cluster(resources)
    bundles, selectors, placements = cluster._bundles([cluster.role("trainer"), cluster.role("reference")])
    assert bundles == [{"CPU": 1, "GPU": 1, "node_a": 0.01}, {"CPU": 1, "GPU": 1}, {"CPU": 1, "GPU": 1, "ref_pool": 1}]
    assert selectors == [{}, {"pool": "b"}, {"zone": "!z1"}]
    assert placements["trainer"].bundles == [0, 1] and placements["reference"].bundles == [2]


def test_one_entry_applies_to_every_rank_and_colocated_roles_follow_the_trainer():
    resources = ResourcesConfig(
        trainer=RoleResources(num_workers=2, num_gpus=1, placement=[{"labels": {"pool": "h100"}}]),
        rollout=RolloutResources(num_workers=2, placement=[{"labels": {"pool": "ignored"}}]),
        colocate=True,
    )
    cluster = Cluster(resources)
    bundles, selectors, placements = cluster._bundles([cluster.role("trainer"), cluster.role("rollout")])
    assert bundles == [{"GPU": 1, "CPU": 2}, {"GPU": 1, "CPU": 2}]
    assert selectors == [{"pool": "h100"}, {"pool": "h100"}]  # the rollout engines share the trainer's bundles
    assert placements["rollout"].bundles == [0, 1] and placements["rollout"].num_gpus == 0.5


def test_placement_needs_one_entry_or_one_per_rank():
    with pytest.raises(ConfigError, match=r"resources.trainer: 2 placement entries for 3 workers"):
        load_config(None, ["resources.trainer.num_workers=3",
                           "resources.trainer.placement=[{resources: {a: 1}}, {resources: {b: 1}}]"])
    with pytest.raises(ConfigError, match=r"placement\[0\].resources.a"):
        load_config(None, ["resources.trainer.placement=[{resources: {a: 0}}]"])


# ---- a real multi-node cluster on this machine ---------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / "ray", *args], env=env, capture_output=True, text=True, timeout=timeout)


def start_node(env: dict, temp: Path, name: str, *args: str) -> subprocess.Popen:
    """`ray start --block` in its own process group: stopping it stops that node's processes only
    (never `ray stop`, which would stop every Ray on the machine)."""
    # Nodes on one machine need their own ports and their own temp dir, as on separate machines:
    # a shared one would let one node's runtime-env agent delete files another node's job runs in.
    ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--runtime-env-agent-port={free_port()}"]
    with open(temp / f"{name}.log", "w") as log:
        return subprocess.Popen([BIN / "ray", "start", "--block", f"--temp-dir={temp / name}", "--disable-usage-stats",
                                 "--object-store-memory=300000000", *ports, *args],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop_node(proc: subprocess.Popen) -> None:
    for sig, patience in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=patience)
            return
        except subprocess.TimeoutExpired:
            continue


def scrape_until(port: int, seen: set[str], done: threading.Event) -> None:
    """Collect the rayalign metric names exported on ``port`` until ``done``, and once after."""
    while True:
        finished = done.is_set()
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            seen.update(re.findall(r"^(ray_rayalign_\w+)\{", text, flags=re.M))
        except OSError:
            pass  # the agent is not serving yet
        if finished:
            return
        done.wait(3)


def alive_nodes(env: dict, gcs: int) -> list[dict]:
    out = ray_cli(env, "list", "nodes", "--address", f"127.0.0.1:{gcs}", "--format", "json", "--detail",
                  "--filter", "state=ALIVE")
    return json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip().startswith("[") else []


@pytest.fixture(scope="module")
def job():
    # A short root: Ray's socket paths under it must fit in 107 characters.
    temp = Path(tempfile.mkdtemp(prefix="ra-mn-", dir="/tmp"))
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    subprocess.run([BIN / "ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    gcs, dash, metrics = free_port(), free_port(), free_port()
    nodes = [start_node(env, temp, "head", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                        f"--dashboard-port={dash}", f"--metrics-export-port={metrics}",
                        f"--ray-client-server-port={free_port()}", "--num-cpus=0", '--resources={"head": 1}')]
    try:
        deadline = time.monotonic() + 180
        while not alive_nodes(env, gcs):
            assert time.monotonic() < deadline, (temp / "head.log").read_text()[-3000:]
            time.sleep(3)
        nodes.append(start_node(env, temp, "node_a", f"--address=127.0.0.1:{gcs}", "--num-cpus=2",
                                '--resources={"node_a": 1}'))
        nodes.append(start_node(env, temp, "node_b", f"--address=127.0.0.1:{gcs}", "--num-cpus=2",
                                '--resources={"node_b": 1}', "--labels=pool=b"))
        while len(alive_nodes(env, gcs)) < 3:
            assert time.monotonic() < deadline, "worker nodes did not join"
            time.sleep(3)

        # Rank 0 by a custom resource, rank 1 by a node label: both ways an operator pins workers.
        out = temp / "run"
        config = load_config(REPO / "recipes" / "configs" / "sft_then_dpo.yaml").model_dump(mode="json")
        config.update(output_dir=str(out), stages=[{"sft": {"epochs": 1, "max_tokens_per_micro_batch": 128}}])
        config["resources"]["trainer"].update(num_workers=2, num_cpus=1, placement=[
            {"resources": {"node_a": 0.01}}, {"labels": {"pool": "b"}}])
        (temp / "multinode.yaml").write_text(yaml.safe_dump(config))
        # Scrape the head's Prometheus port while the job runs, as Prometheus would.
        seen: set[str] = set()
        done = threading.Event()
        scraper = threading.Thread(target=scrape_until, args=(metrics, seen, done), daemon=True)
        scraper.start()
        proc = subprocess.run(
            [BIN / "ray", "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(REPO),
             "--", "python", "recipes/sft_then_dpo.py", "--config", str(temp / "multinode.yaml")],
            env=env, capture_output=True, text=True, timeout=900,
        )
        done.set()
        scraper.join()
        actors = ray_cli(env, "list", "actors", "--address", f"127.0.0.1:{gcs}", "--format", "json", "--detail",
                         "--limit", "1000")
        yield proc, out, json.loads(actors.stdout), alive_nodes(env, gcs), seen
    finally:
        for node in reversed(nodes):
            stop_node(node)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_recipe_job_succeeds_on_the_three_node_cluster(job):
    proc, out, _, nodes, _ = job
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (out / "00-sft" / "model" / "config.json").exists() and (out / "report.html").exists()
    assert len(nodes) == 3


@pytest.mark.slow
def test_each_trainer_rank_ran_on_the_node_meant_for_it(job):
    _, _, actors, nodes, _ = job
    resources = {n["node_id"]: n["resources_total"] for n in nodes}
    node_of = {a["name"]: a["node_id"] for a in actors if a.get("name", "").startswith("sft/trainer/")}
    assert set(node_of) == {"sft/trainer/0", "sft/trainer/1"}
    assert "node_a" in resources[node_of["sft/trainer/0"]]
    assert "node_b" in resources[node_of["sft/trainer/1"]]  # the node labelled pool=b


@pytest.mark.slow
def test_driver_metrics_reach_the_head_nodes_prometheus_port(job):
    *_, seen = job
    # The job's driver runs on the head, so its metrics are on the port `ray start --head
    # --metrics-export-port` opened, where Prometheus scrapes them.
    assert {"ray_rayalign_loss", "ray_rayalign_lr", "ray_rayalign_grad_norm", "ray_rayalign_progress",
            "ray_rayalign_throughput_per_s", "ray_rayalign_stage_status", "ray_rayalign_processed_total"} <= seen
