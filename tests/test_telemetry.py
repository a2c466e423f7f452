"""Dashboard metrics: recorded through ray.util.metrics, scraped in Prometheus format from the node.

A real local Ray node exports every process's metrics on its metrics export port (the port
`ray start --metrics-export-port` sets); the test reads it with urllib, as Prometheus would. The
Grafana dashboard and the operator doc must name only metrics that exist, and all of them.
"""

import json
import re
import subprocess
import sys
import time
import urllib.request

import pytest
import ray

from rayalign import telemetry

from conftest import REPO


def scrape(port: int, host: str = "127.0.0.1") -> str:
    return urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()


def wait_for_series(port: int, wanted: list[str], host: str = "127.0.0.1", timeout_s: float = 90) -> str:
    """The scrape text once every regex in ``wanted`` matches (the agent exports every few seconds)."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = scrape(port, host)
        missing = [w for w in wanted if not re.search(w, text, flags=re.M)]
        if not missing:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"not exported after {timeout_s:.0f}s: {missing}\n" + "\n".join(
                line for line in text.splitlines() if "rayalign" in line))
        time.sleep(2)


def series(name: str, value: str | None, **tags: str) -> str:
    """A regex for one Prometheus sample line with these tags (in any order among Ray's own) and
    this value (None: any number)."""
    lookaheads = "".join(f'(?=[^}}]*\\b{k}="{re.escape(v)}")' for k, v in tags.items())
    number = r"[-+]?[0-9.]+(e[-+]?[0-9]+)?" if value is None else re.escape(value)
    return f"^{re.escape(name)}{{{lookaheads}[^}}]*}} {number}$"


@pytest.fixture(scope="module")
def node():
    # address="local": a fresh node of our own, never another cluster running on this machine.
    ray.init(address="local", num_cpus=1, include_dashboard=False, namespace="rayalign-tests")
    info = ray.nodes()[0]
    yield info["NodeManagerAddress"], info["MetricsExportPort"]
    ray.shutdown()


@pytest.mark.slow
def test_driver_metrics_reach_prometheus_with_stage_and_role_tags(node):
    host, port = node
    telemetry.stage_started("dpo")
    for step in (1, 2):
        telemetry.record_train_step("dpo", step, 4, {"loss": 0.5 / step, "lr": 1e-5, "grad_norm": 2.0,
                                                      "reward_accuracy": 0.75, "count": 8.0}, items_per_s=16.0)
    telemetry.record_generation("generate", tokens=300, seconds=1.5)
    # Metrics other subsystems add (RL, evaluation, weight sync) go through the same generic call.
    telemetry.record_stage_metrics("grpo", {"reward": 0.25, "kl": 0.03, "repetition_rate": 0.125,
                                            "hallucination_rate": 0.0625, "weight_sync_s": 1.5,
                                            "unknown_key": 7.0, "history": [{"loss": 1.0}]})
    telemetry.stage_finished("dpo", 12.5)
    wanted = [
        series("ray_rayalign_loss", "0.25", stage="dpo", role="trainer"),
        series("ray_rayalign_lr", "1e-05", stage="dpo", role="trainer"),
        series("ray_rayalign_grad_norm", "2.0", stage="dpo", role="trainer"),
        series("ray_rayalign_reward_accuracy", "0.75", stage="dpo", role="trainer"),
        series("ray_rayalign_step", "2.0", stage="dpo", role="trainer"),
        series("ray_rayalign_progress", "0.5", stage="dpo", role="trainer"),
        series("ray_rayalign_throughput_per_s", "16.0", stage="dpo", role="trainer"),
        series("ray_rayalign_processed_total", "16.0", stage="dpo", role="trainer"),
        series("ray_rayalign_throughput_per_s", "200.0", stage="generate", role="rollout"),
        series("ray_rayalign_processed_total", "300.0", stage="generate", role="rollout"),
        series("ray_rayalign_reward", "0.25", stage="grpo", role="driver"),
        series("ray_rayalign_kl", "0.03", stage="grpo", role="driver"),
        series("ray_rayalign_repetition_rate", "0.125", stage="grpo", role="driver"),
        series("ray_rayalign_hallucination_rate", "0.0625", stage="grpo", role="driver"),
        series("ray_rayalign_weight_sync_s", "1.5", stage="grpo", role="driver"),
        series("ray_rayalign_stage_status", str(float(telemetry.FINISHED)), stage="dpo", role="driver"),
        series("ray_rayalign_stage_seconds", "12.5", stage="dpo", role="driver"),
    ]
    text = wait_for_series(port, wanted, host)
    assert "# TYPE ray_rayalign_loss gauge" in text
    assert "# TYPE ray_rayalign_processed_total counter" in text
    assert "unknown_key" not in text and "rayalign_history" not in text  # only known keys are exported
    # Ray's agent drops a gauge ~20 s after it was last set; telemetry keeps setting the last values,
    # so a stage's status and final loss stay on the dashboard while the driver lives.
    time.sleep(30)
    wait_for_series(port, wanted, host, timeout_s=0)


def test_recording_without_ray_is_a_no_op():
    # A fresh interpreter: Ray not initialised, as in `rayalign report` or a unit test.
    code = (
        "from rayalign import telemetry\n"
        "import ray\n"
        "telemetry.stage_started('sft')\n"
        "telemetry.record_train_step('sft', 1, 2, {'loss': 1.0, 'count': 3.0}, 3.0)\n"
        "telemetry.record_generation('generate', 10, 1.0)\n"
        "telemetry.record_stage_metrics('sft', {'kl': 0.1})\n"
        "telemetry.stage_finished('sft', 1.0, failed=True)\n"
        "assert not ray.is_initialized()\n"
        "assert telemetry._gauge.cache_info().currsize == 0, 'metrics created without Ray'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)



def exported_names() -> set[str]:
    return {f"ray_{telemetry.PREFIX}{name}" for name in {**telemetry.KNOWN, **telemetry.OTHER}} | {
        f"ray_{telemetry.PREFIX}processed_total"}


def test_grafana_dashboard_queries_only_metrics_that_exist():
    dashboard = json.loads((REPO / "deploy" / "grafana-dashboard.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"\bray_rayalign_\w+", target["expr"])}
    assert queried and queried <= exported_names()
    assert {"ray_rayalign_loss", "ray_rayalign_kl", "ray_rayalign_reward", "ray_rayalign_repetition_rate",
            "ray_rayalign_hallucination_rate", "ray_rayalign_weight_sync_s", "ray_rayalign_throughput_per_s"} <= queried


def test_operations_doc_lists_every_metric():
    doc = (REPO / "docs" / "operations.md").read_text()
    assert not [name for name in exported_names() if f"`{name}`" not in doc]
