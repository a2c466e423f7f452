"""The example plugin's own tests, written with rayalign.testing as any plugin author would."""

from rayalign.testing import assert_jsonl, assert_metrics, run_stage

from rayalign_example.rewards import mentions_reference


def test_reward_rule():
    assert mentions_reference("Where?", "Bob lives in Parvel.", reference="Bob lives in Parvel.") == 1.0
    assert mentions_reference("Where?", "Bob lives in Ostrin.", reference="Bob lives in Parvel.") == 0.0
    assert mentions_reference("Where?", "anything", reference=None) == 0.0


def test_reward_eval_stage_runs_on_the_tiny_model(tmp_path, rayalign_ray):
    run = run_stage("reward_eval", {"num_prompts": 3, "max_new_tokens": 8}, tmp_path=tmp_path)
    assert_metrics(run, "mean_reward", "exclamation_rate")
    rows = assert_jsonl(run.dir / "scored.jsonl", ["prompt", "completion", "reward"], min_rows=3)
    assert run.metrics["mean_reward"] == sum(r["reward"] for r in rows) / len(rows)
