"""The tables the docs publish: one function per region, registered with ``@region("name")``.

Each function reads result files through ``Results`` (``newest``, ``runs``, ``find`` + ``cite``)
and returns markdown; ``publish.py`` puts it between the region's markers in the docs and names
the files it read under it. A table for a new benchmark is one more function here and the two
markers in the doc where it belongs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from rayalign_fixes.evaluate import ROWS as EVALUATE_ROWS
from result_files import PublishError, ResultFile, Results

REGIONS: dict[str, Callable[[Results], str]] = {}


def region(name: str):
    """Register ``render(results) -> markdown`` as the renderer of ``<!-- publish:name -->``."""
    def register(render):
        REGIONS[name] = render
        return render
    return register


# -- formatting ------------------------------------------------------------------------------------

def k(x: float) -> str:
    """73194.9 -> 73.2k"""
    return f"{x / 1000:.1f}k"


def times(x: float | None) -> str:
    return f"{x:.2f}×" if x is not None else "–"


def gib(x: float) -> str:
    return f"{x:.1f} GiB"


def thousands(x: float) -> str:
    return f"{x:,.0f}"


def day(f: ResultFile) -> str:
    return f.when[:10]


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


# -- performance: the targets (docs/performance.md, README.md) ------------------------------------

@dataclass
class Target:
    """One row of the targets table: what is measured, against what, the latest figure and verdict."""
    label: str
    what: str
    baseline: str
    target: str
    latest: str = "not measured yet: no result file"
    short: str = ""  # the README's one-line form; empty: not in the README
    met: str = "–"


def sft_target(results: Results) -> Target:
    f = results.newest("sft_throughput-0.5b", "h200", sides=("rayalign", "torch_reference", "trl_tuned"))
    s = f.data["summary"]
    tps, mfu, peak = s["tokens_per_s_median"], s["mfu"], s["peak_gib"]

    def side(name):
        return f"{k(tps[name])} ({100 * mfu[name]:.1f}% MFU, {gib(peak[name])})"

    met = [s["vs_torch_reference"] >= 1.0 and s["peak_vs_torch_reference"] <= 1.0, s["vs_trl_tuned"] >= 1.3]
    return Target(
        "a", "SFT stage, non-pad tokens/s (`sft_throughput.py`)",
        "`torch_reference` (the best plain PyTorch loop: packed rows, bf16 weights, fused AdamW, chunked CE); "
        "`trl_tuned` (TRL `SFTTrainer`: padding-free, no gradient checkpointing, Liger, fused AdamW, the same "
        "attention kernel)", "≥ 1.0× `torch_reference` at no more peak memory; ≥ 1.3× `trl_tuned`",
        f"{day(f)}: rayalign **{side('rayalign')}**, `torch_reference` {side('torch_reference')}, `trl_tuned` "
        f"{side('trl_tuned')}: **{times(s['vs_torch_reference'])}** the reference, "
        f"**{times(s['vs_trl_tuned'])}** tuned TRL",
        f"SFT {k(tps['rayalign'])} tokens/s ({100 * mfu['rayalign']:.1f}% MFU, {gib(peak['rayalign'])}) against a "
        f"plain PyTorch loop's {k(tps['torch_reference'])} and tuned TRL's {k(tps['trl_tuned'])} "
        f"({times(s['vs_torch_reference'])}, {times(s['vs_trl_tuned'])}; {day(f)})",
        {(True, True): "yes", (False, False): "no (both)", (False, True): "no (the reference)",
         (True, False): "no (TRL)"}[tuple(met)])


def dpo_target(results: Results) -> Target:
    f = results.newest("dpo_throughput-0.5b", "h200", sides=("rayalign", "trl_tuned"))
    s = f.data["summary"]
    pps, train, peak = s["pairs_per_s_median"], s["pairs_per_s_train_steps_only"], s["peak_gib"]
    return Target(
        "b", "DPO stage, pairs/s (`dpo_throughput.py`)",
        "`trl_tuned`: TRL `DPOTrainer` with `precompute_ref_log_probs`, Liger, fused AdamW", "≥ 1.5× `trl_tuned`",
        f"{day(f)}: rayalign **{pps['rayalign']:.1f}** pairs/s with its reference pass ({train['rayalign']:.1f} in "
        f"the training steps alone; {gib(peak['rayalign'])}), `trl_tuned` {pps['trl_tuned']:.1f} "
        f"({train['trl_tuned']:.1f}; {gib(peak['trl_tuned'])}): **{times(s['vs_trl_tuned'])}**",
        f"DPO {pps['rayalign']:.1f} pairs/s with the reference pass against tuned TRL's {pps['trl_tuned']:.1f} with "
        f"precomputed reference log-probs ({times(s['vs_trl_tuned'])}; {day(f)})",
        "yes" if s["vs_trl_tuned"] >= 1.5 else "no")


ROLLOUT_RUNS = ("rollout_throughput-0.5b", "rollout_inproc-0.5b", "rollout_causes-0.5b")


def rollout_day(results: Results) -> list[ResultFile]:
    """The rollout files of the newest day with any, oldest first (they are read as one series)."""
    found = [f for name in ROLLOUT_RUNS for f in results.find(name, "h200")]
    if not found:
        results.newest(ROLLOUT_RUNS[0], "h200")  # fails, naming the file
    newest = max(day(f) for f in found)
    return results.cite(sorted((f for f in found if day(f) == newest), key=lambda f: f.when))


def engine_core(side: dict) -> str:
    if "engine_core" in side:
        return side["engine_core"]
    return "in_process" if side.get("engine_in_process") else "child"


def rollout_rate(side: dict, variant: str = "default") -> float:
    rates = side.get("variants", {}).get(variant, side)["tokens_per_s"]["per_step"]
    return rates["median"]


def rollout_pairs(files: list[ResultFile]) -> list[tuple[ResultFile, str, float, float]]:
    """(file, rayalign side's engine core, its tokens/s, raw vLLM's) for every run with both."""
    pairs = []
    for f in files:
        raw = f.side("raw_vllm")
        for name, side in f.data["sides"].items():
            if raw and name.startswith("rayalign") and not side.get("enforce_eager") and side.get("actor_cpus", 1) == 1:
                pairs.append((f, engine_core(side), rollout_rate(side), rollout_rate(raw)))
    return pairs


def rollout_target(results: Results) -> Target:
    files = rollout_day(results)
    pairs = rollout_pairs(files)
    current = [p for p in pairs if p[1] == "in_process"]  # engine_core: auto keeps the core in the actor
    raws = [rollout_rate(f.side("raw_vllm")) for f in files if f.side("raw_vllm")]
    where = {"in_process": "engine core in the actor (the default)", "child": "engine core in a child process"}
    latest = "; ".join(f"{where[core]} **{k(ours)}** against raw vLLM's {k(raw)} in the same run "
                       f"(**{times(ours / raw)}**, `{f.name}`)" for f, core, ours, raw in pairs)
    # One run does not settle it while raw vLLM's own figure moves between runs of the same day.
    verdicts = {ours / raw >= 0.9 for _, _, ours, raw in current}
    settled = len(current) >= 2 and len(verdicts) == 1
    met = ("yes" if verdicts == {True} else "no") if settled else "not settled"
    spread_note = (f". Raw vLLM measured {' and '.join(k(r) for r in raws)} in the runs of {day(files[0])}, "
                   f"so {'these runs agree' if settled else 'one run does not settle it'}") if len(raws) > 1 else ""
    short = ""
    if current:
        f, _, ours, raw = current[-1]  # the newest run
        others = [r for r in raws if r != raw]
        short = (f"rollouts through Ray {k(ours)} output tokens/s against raw vLLM's {k(raw)} in the same run "
                 f"({times(ours / raw)}; {day(f)})")
        if others:
            earlier = "/".join(times(o / r) for _, _, o, r in current[:-1])
            short += (f"; raw vLLM measured {' and '.join(map(k, others))} in another run that day, "
                      + (f"where the ratio was {earlier} (settled)" if settled else "not settled"))
    return Target("c", "rollout workers through Ray, output tokens/s (`rollout_throughput.py`)",
                  "raw `vllm.LLM.generate`, same prompts, sampling and memory fraction", "≥ 0.9×",
                  f"{day(files[0])}: {latest}{spread_note}", short, met)


def grpo_target(results: Results) -> Target:
    f = results.newest("grpo_step-0.5b", "h200", sides=("rayalign", "trl"))
    s, ours = f.data["summary"], f.side("rayalign")
    phases = ", ".join(f"{p} {v:.2f}" for p, v in ours["phase_seconds_median"].items())
    steps = ours["step_time"]["n"]
    peak = s["device_peak_gib"]
    return Target(
        "e", "GRPO step time (`grpo_step.py`)", "TRL `GRPOTrainer` with vLLM colocated (TRL's defaults)",
        "≤ 0.7× TRL's time",
        f"{day(f)}, colocated, both sides in one run: rayalign **{s['step_seconds_median']['rayalign']:.2f} s** a step "
        f"(median of {steps}: {phases}; device peak {gib(max(peak['rayalign'].values()))}), TRL "
        f"{s['step_seconds_median']['trl']:.2f} s ({gib(max(peak['trl'].values()))}): **{times(s['time_vs_trl'])}**",
        f"colocated GRPO {s['step_seconds_median']['rayalign']:.2f} s a step against TRL's "
        f"{s['step_seconds_median']['trl']:.2f} s in the same run ({times(s['time_vs_trl'])}; {day(f)})",
        "yes" if s["time_vs_trl"] <= 0.7 else "no")


def unmeasured(label: str, what: str, baseline: str, target: str, name: str):
    """A target with no file yet; once one lands, its row has to be written (so it is not ignored)."""
    def row(results: Results) -> Target:
        if any(f.name.startswith(name) for f in results.files):
            raise PublishError(f"a {name} result file exists: write its target row in benchmarks/doc_tables.py")
        return Target(label, what, baseline, target)
    return row


TARGETS = [sft_target, dpo_target, rollout_target,
           unmeasured("d", "weight sync trainer → vLLM, seconds (`weight_sync.py`)",
                      "physical limit: bytes ÷ device bandwidth",
                      "0.5B colocated p50 ≤ 0.5 s; across two GPUs ≤ 1 s",
                      "weight_sync"),
           grpo_target,
           unmeasured("f", "SFT scaling 1 → 2 → 4 GPUs, H200 (`sft_scaling.py`)", "linear",
                      "≥ 85% efficiency at 4", "sft_scaling")]


@region("targets")
def targets_table(results: Results) -> str:
    rows = [t(results) for t in TARGETS]
    return table(["#", "rayalign", "baseline in the same run", "target", "latest (one H200, 0.5B shape)", "met?"],
                 [[t.label, t.what, t.baseline, t.target, t.latest, t.met] for t in rows])


@region("readme-performance")
def readme_performance(results: Results) -> str:
    rows = [t(results) for t in TARGETS]
    measured = "; ".join(t.short for t in rows if t.short)
    return f"Measured on one H200 (Qwen2-0.5B shape, bf16): {measured}."


# -- performance: the runs behind rows a, c, e -----------------------------------------------------

ROLLOUT_VARIANTS = {"detokenize": "the same engine, detokenizing in the actor",
                    "objects": "the same engine, `Completion` objects through Ray"}


def rollout_side_label(name: str, side: dict) -> str:
    core = {"in_process": "engine core in the rollout actor", "child": "engine core in a child process"}
    who = f"`{name}`: " + ("raw `vllm.LLM`" if name.startswith("raw_vllm") else "rayalign's rollout workers")
    extra = [core[engine_core(side)]]
    if side.get("actor_cpus", 1) != 1:
        extra.append(f"{side['actor_cpus']} CPUs per rollout actor")
    if side.get("enforce_eager"):
        extra.append("eager (no CUDA graphs)")
    return f"{who}, {', '.join(extra)}"


@region("rollout-runs")
def rollout_runs(results: Results) -> str:
    files = rollout_day(results)
    settings = {json.dumps({k_: v for k_, v in f.data["settings"].items() if k_ != "repeats"}, sort_keys=True)
                for f in files}
    if len(settings) != 1:
        raise PublishError(f"the rollout runs of {day(files[0])} differ in settings: not one series")
    st = files[0].data["settings"]
    rows = []
    for f in files:
        raw = f.side("raw_vllm")
        for name, side in f.data["sides"].items():
            n = side["tokens_per_s"]["per_step"]["n"]
            rate = rollout_rate(side)
            vs_raw = times(rate / rollout_rate(raw)) if raw and side is not raw else ""
            first = name == next(iter(f.data["sides"]))
            rows.append([f"`{f.name}`" if first else "", rollout_side_label(name, side), f"{k(rate)} (median of {n})", vs_raw,
                         f"{side['engine_load_s']:.1f}"])
            for variant, label in ROLLOUT_VARIANTS.items():
                if variant in side.get("variants", {}):
                    v = rollout_rate(side, variant)
                    rows.append(["", label, k(v), f"{times(v / rollout_rate(raw))} ({times(v / rate)} the default call)"
                                 if raw else f"{times(v / rate)} the default call", ""])
    commits = sorted({(f.data.get("git_commit") or "no commit")[:7] for f in files})
    intro = (f"{day(files[0])}, one H200, {len(files)} invocations of `rollout_throughput.py` one after the other "
             f"(commit {', '.join(commits)}), each side in its own process with the GPU to itself: {st['prompts']} "
             f"prompts of {st['prompt_len']} random tokens, {st['max_tokens']} new tokens each, temperature "
             f"{st['temperature']}, vLLM's memory share {st['gpu_memory_utilization']}, CUDA graphs unless a side "
             f"says eager. Output tokens/s, median of the timed calls:")
    return intro + "\n\n" + table(["run", "side", "tokens/s", "vs raw vLLM in the same run", "engine start, s"], rows)


@region("sft-liger")
def sft_liger(results: Results) -> str:
    f = results.newest("sft_throughput-0.5b", "h200", sides=("rayalign_liger", "rayalign"))
    s = f.data["summary"]
    rows = [[f"`{side}`", k(s["tokens_per_s_median"][side]), f"{100 * s['mfu'][side]:.1f}%", gib(s["peak_gib"][side])]
            for side in ("rayalign", "rayalign_liger")]
    ratio_mem = s["peak_gib"]["rayalign_liger"] / s["peak_gib"]["rayalign"]
    return (table(["side (same run)", "tokens/s", "MFU", "peak"], rows) +
            f"\n\n`rayalign_liger` against the defaults: {times(s['liger_vs_default'])} the speed for "
            f"{times(ratio_mem)} the memory ({day(f)}).")


GRPO_RUNS = ("grpo_step-0.5b", "grpo_step-0.5b-rayalign", "grpo_step-0.5b-trl")  # earlier runs: a file per side


def grpo_files(results: Results, where=None) -> list[ResultFile]:
    files = results.cite(sorted((f for name in GRPO_RUNS for f in results.find(name, "h200", where=where)),
                                key=lambda f: f.when, reverse=True))
    if not files:
        results.newest(GRPO_RUNS[0], "h200", where=where)  # fails, naming the file
    return files


def settings_unlike(f: ResultFile, reference: ResultFile) -> str:
    ours, theirs = f.data.get("settings", {}), reference.data.get("settings", {})
    return ", ".join(f"{key} {ours.get(key)} (newest: {theirs.get(key)})" for key in sorted(set(ours) | set(theirs))
                     if key not in ("warmup", "steps") and ours.get(key) != theirs.get(key))


@region("grpo-runs")
def grpo_runs(results: Results) -> str:
    """Every GRPO step run, newest first, with what its settings did differently from the newest."""
    files = grpo_files(results)
    rows = []
    for f in files:
        for name, side in f.data["sides"].items():
            st = side["step_time"]
            phases = side.get("phase_seconds_median", {})
            colocation = side.get("colocation_seconds_median")
            rows.append([day(f), f"`{f.path.name}`", name, f"{st['median']:.2f} ({st['min']:.2f}–{st['max']:.2f}, "
                         f"{st['n']} steps)", *[f"{phases[p]:.2f}" if p in phases else "" for p in
                                                ("generate", "score", "train", "sync")],
                         f"{sum(colocation.values()):.2f}" if colocation else "not recorded",
                         gib(max(side["device_peak_gib"].values())), settings_unlike(f, files[0])])
    return table(["day", "file", "side", "step s, median (min–max)", "generate", "score", "train", "sync",
                  "sleep/wake/release s", "device peak", "settings unlike the newest run's"], rows)


@region("grpo-memory")
def grpo_memory(results: Results) -> str:
    """The device's peak per phase against the colocated memory plan, in every GRPO file that has both."""
    def planned(f: ResultFile) -> bool:
        """rayalign's side with its memory plan"""
        return "memory_plan_gib" in f.side("rayalign")

    rows = []
    files = grpo_files(results, planned) + results.runs("grpo_step-0.5b-rl_memory_test", "h200", where=planned)
    for f in files:
        side = f.side("rayalign")
        plan, peak = side["memory_plan_gib"], side["device_peak_gib_by_phase"]
        roles = side.get("reserved_peak_gib_by_phase_and_role", {})
        for phase in plan:
            trainer = roles.get(phase, {}).get("trainer")
            rows.append([f"`{f.path.name}`" if phase == next(iter(plan)) else "", phase, f"{plan[phase]:.1f}",
                         f"{peak[phase]:.1f}", times(peak[phase] / plan[phase]),
                         f"{trainer:.1f}" if trainer is not None else "not recorded",
                         f"{peak[phase] - trainer:.1f}" if trainer is not None else ""])
        rows.append(["", "the plan, as logged", side["memory_plan"], "", "", "", ""])
    return table(["file", "phase", "plan GiB", "device peak GiB", "peak ÷ plan", "policy trainer reserved GiB",
                  "device peak less the trainer's GiB"], rows)


# -- the gpu tests (docs/performance.md) ----------------------------------------------------------

# run_all.sh's parts of the `gpu` suite, in its order; each writes <gpu>-<date>-gpu_tests-<part>.json.
GPU_TEST_PARTS = ("rl-memory-0.5b", "rl-memory-1.5b", "kernels", "engines", "recipes")


@region("gpu-tests")
def gpu_tests(results: Results) -> str:
    """Every test of the newest file of each part: outcome, seconds, and why where it did not pass;
    then the device peaks the colocated GRPO tests recorded against their memory plan."""
    rows, peaks = [], []
    for part in GPU_TEST_PARTS:
        found = results.cite(results.find(f"gpu_tests-{part}")[:1])
        if not found:
            rows.append([f"`{part}`", "not run yet", "", "", "", ""])
            continue
        f = found[0]
        run = f"{f.device}, {day(f)}, commit {(f.data.get('git_commit') or 'unknown')[:7]}"
        for i, (test, t) in enumerate(f.data["tests"].items()):
            rows.append([f"`{part}`" if i == 0 else "", run if i == 0 else "", f"`{test.split('/')[-1]}`",
                         t["outcome"], f"{t['seconds']:.0f}", t.get("reason", "")])
            plan, peak = t["properties"].get("memory_plan_gib"), t["properties"].get("device_peak_gib_by_phase")
            if plan and peak:
                for j, phase in enumerate(plan):
                    peaks.append([f"`{test.split('::')[-1]}`" if j == 0 else "", phase, f"{plan[phase]:.1f}",
                                  f"{peak[phase]:.1f}", times(peak[phase] / plan[phase])])
        if f.data.get("unfinished"):
            rows.append(["", "", f"`{f.data['unfinished'].split('/')[-1]}`", "unfinished (the part's time limit)",
                         "", ""])
    text = table(["part", "run", "test", "outcome", "seconds", "reason"], rows)
    if peaks:
        text += "\n\n" + table(["test", "phase", "plan GiB", "device peak GiB", "peak ÷ plan"], peaks)
    return text


# -- the memory planner (docs/memory.md) ----------------------------------------------------------

def pct(x: float | None) -> str:
    return f"{100 * x:+.1f}%" if x is not None else "–"


@region("memory-heldout")
def memory_heldout(results: Results) -> str:
    """Every configuration of the newest validation: the estimate with the constants fitted on the
    fit rows (memory.py's now) and with the ones before, against what the trainer allocated."""
    f = results.newest("memory_validation-heldout", "h200", where=lambda f: f.data.get("complete"))
    s = f.data["summary"]
    rows = []
    for r in sorted(f.data["rows"], key=lambda r: r["split"] != "held_out"):
        m, fit, now = r.get("measured", {}), r.get("with_fitted", {}), r.get("with_current", {})
        if not m:
            rows.append([r["split"], r["name"], "–", "–", "–", "–", "–", "–", f"not run: {r.get('skipped') or r.get('error')}"])
            continue
        rows.append([r["split"], r["name"], f"{fit['training_total_gib']:.1f}", f"{m['allocated_gib']:.1f}",
                     pct(fit["allocated_error"]), pct(now["allocated_error"]), f"{m['device_used_gib']:.1f}",
                     pct(fit["device_error"]), ""])
    fitted, before = s["fitted"], s["current"]
    constants = lambda c: ", ".join(f"{k} {v:.3g}" for k, v in c.items())  # noqa: E731
    return (table(["split", "configuration", "estimate GiB (fitted)", "allocated GiB", "error (fitted)",
                   "error (constants before)", "device used GiB", "device error (fitted)", ""], rows) +
            f"\n\nOne H200, {day(f)}, {f.data['settings']['tokens_per_micro_batch']} tokens per micro-batch, "
            f"{f.data['settings']['steps']} steps a configuration. Fitted on the {sum(r['split'] == 'fit' for r in f.data['rows'] if r.get('measured'))} "
            f"measured fit rows: {constants(fitted)} (before: {constants(before)}). Held-out rows "
            f"({s['held_out_measured']} measured): largest allocated error {100 * s['held_out_allocated_max_abs_error_fitted']:.1f}% "
            f"either way (target 15%: {'met' if s['target_met'] else 'not met'}); largest device error "
            f"{100 * s['held_out_device_max_abs_error_fitted']:.1f}% either way.")


@region("memory-qlora")
def memory_qlora(results: Results) -> str:
    """The QLoRA rows, measured after the constants were fitted: each is out of sample for them."""
    f = results.newest("memory_validation-qlora", "h200")
    rows = []
    for r in f.data["rows"]:
        m, now = r["measured"], r["with_current"]
        rows.append([r["split"], r["name"], f"{now['training_total_gib']:.1f}", f"{m['allocated_gib']:.1f}",
                     pct(now["allocated_error"]), f"{m['device_used_gib']:.1f}", pct(now["device_error"])])
    return (table(["split in the matrix", "configuration", "estimate GiB", "allocated GiB", "error",
                   "device used GiB", "device error"], rows) +
            f"\n\nOne H200, {day(f)}, {f.data['settings']['tokens_per_micro_batch']} tokens per micro-batch, "
            f"{f.data['settings']['steps']} steps a configuration, with memory.py's constants as fitted on the other "
            f"rows.")


# -- asynchronous RL (docs/rl.md) ------------------------------------------------------------------

@region("async-rl")
def async_rl(results: Results) -> str:
    """Step time and rewards of the synchronous loop (K=0) and the asynchronous one, same GPUs."""
    f = results.newest("async_rl-0.5b", "h200", sides=("k0",))
    s, st = f.data["summary"], f.data["settings"]
    rows = []
    for side, r in f.data["sides"].items():
        reward = r["per_step"]["reward"]
        rows.append([f"`{side}`", str(r["max_staleness"]), f"{r['step_time']['median']:.2f}",
                     times(s["speedup_vs_sync"].get(side, 1.0)), f"{max((x or 0) for x in r['per_step']['async/staleness_max']):.0f}",
                     f"{reward[0]:.2f} → {reward[-1]:.2f}", f"{r['eval_reward_before']:.2f} → {r['eval_reward']:.2f}",
                     gib(max(r["device_peak_gib"].values()))])
    placement = "trainer and engine split one GPU by memory (`resources.split_gpus`)" \
        if f.data["sides"]["k0"]["gpus"] == 1 else "trainer and engine on GPUs of their own"
    return (table(["side", "max_staleness", "step s (median)", "speed-up vs K=0", "staleness max",
                   "train reward, first → last step", "held-out reward, before → after", "device peak"], rows) +
            f"\n\nOne H200, {day(f)}, {placement}; {st['steps']} timed steps after {st['warmup']}, "
            f"{st['prompts_per_step']} prompts × {st['num_generations']} answers of at most {st['max_new_tokens']} "
            f"tokens, a random-weight 0.5B-shaped model, vLLM at {st['gpu_memory_utilization']} of the GPU"
            f"{', eager' if st.get('enforce_eager') else ''}; one seed.")


# -- the fixes (README.md) -------------------------------------------------------------------------

# The evaluate stage's rows, less the two the targets do not discuss.
FIX_METRICS = [row for row in EVALUATE_ROWS if row[0] not in ("unchecked_rate", "distinct_2")]
FIX_LABELS = {m: label for m, label, _ in FIX_METRICS}
FIX_KINDS = {m: kind for m, _, kind in FIX_METRICS}  # how a change is told: relative, or in points


def change(before: float, after: float, kind: str) -> str:
    if kind == "relative":
        return f"{100 * (after - before) / before:+.1f}%"
    return f"{100 * (after - before):+.1f} pts"


def bound(spec: dict) -> str:
    unit = "%" if spec["change"] == "relative" else " pts"
    return f"{'at most' if spec['side'] == 'max' else 'at least'} {100 * spec['bound']:+.0f}{unit}"


def declines_alone(runs: list[dict]) -> str:
    """What the fact-error target asks beyond declining: the overall rate of each seed with every
    unanswerable question's error gone and the answerable ones' as before SFT's (the counts weigh
    the two rates); empty for files written before the evaluate stage counted its prompts."""
    if not all("answerable_prompts" in r["metrics"] for r in runs):
        return ""
    best, before = [], []
    for r in runs:
        m = r["metrics"]
        answerable, total = m["answerable_prompts"], m["answerable_prompts"] + m["unanswerable_prompts"]
        best.append(m["fact_error_rate_answerable_before"] * answerable / total)
        before.append(m["fact_error_rate_before"])
    per_seed = ", ".join(f"{r['seed']}: {change(b, x, 'relative')}" for r, b, x in zip(runs, before, best))
    return (f"\n\nDeclines alone can take the fact error rate's mean only so far: with no fact error left on "
            f"unanswerable questions and those on answerable questions as before, it would change by "
            f"{change(sum(before) / len(before), sum(best) / len(best), 'relative')} ({per_seed}). Beyond that, "
            f"the fact-error target needs fewer wrong answers to questions the data can answer.")


def fix_table(f: ResultFile, where: str) -> str:
    """The before/after table of a ``fix_seeds`` file (means ± std over its seeds), the targets judged
    on the means and per seed; ``where`` says what ran each seed's recipe."""
    d = f.data
    stats, runs = d["summary"]["stats"], d["runs"]
    rows = [[label, f"{stats[m + '_before']['mean']:.3f} ± {stats[m + '_before']['std']:.3f}",
             f"{stats[m]['mean']:.3f} ± {stats[m]['std']:.3f}",
             change(stats[m + "_before"]["mean"], stats[m]["mean"], kind)] for m, label, kind in FIX_METRICS]
    targets, met, missed, seeds_missing = [], [], [], []
    for m, spec in d["targets"].items():
        t = d["summary"]["targets"][m]
        per_seed = ", ".join(f"{r['seed']}: {change(r['metrics'][m + '_before'], r['metrics'][m], FIX_KINDS[m])}"
                             f"{'' if ok else ' (missed)'}" for r, ok in zip(runs, t["met_per_seed"]))
        targets.append([FIX_LABELS[m], bound(spec), change(t["before_mean"], t["after_mean"], FIX_KINDS[m]),
                        "yes" if t["met_on_means"] else "**no**", per_seed])
        (met if t["met_on_means"] else missed).append(FIX_LABELS[m])
        missing = [str(r["seed"]) for r, ok in zip(runs, t["met_per_seed"]) if not ok]
        if t["met_on_means"] and missing:
            seeds_missing.append(f"{FIX_LABELS[m]} (seed {', '.join(missing)})")
    return (f"Seeds {', '.join(str(r['seed']) for r in runs)}, `{d['settings']['recipe']}` once per seed {where}; "
            f"mean ± standard deviation over the seeds:\n\n" +
            table(["metric", "before (sft)", "after", "change of the means"], rows) +
            (f"\n\nThe reference answers themselves score seq-rep-4 {stats['seq_rep_4_references']['mean']:.3f} ± "
             f"{stats['seq_rep_4_references']['std']:.3f} (a journey may revisit a city): the floor a perfect fix "
             f"would reach." if "seq_rep_4_references" in stats else "") + "\n\nThe targets:\n\n" +
            table(["metric", "target", "change of the means", "met on the means?", "change per seed"], targets) +
            f"\n\nMet on the means: {', '.join(met) or 'none'}; missed on the means: {', '.join(missed) or 'none'}. "
            f"Seeds that miss a target the means meet: {'; '.join(seeds_missing) or 'none'}." + declines_alone(runs))


# The split the recipe measures on, and the one its hyperparameters were tuned on: a run on the
# tuning split is kept apart from the headline (fix_seeds.py records each seed's ``prompts``).
TEST_SPLIT, TUNING_SPLIT = "synthetic:knowledge/test", "synthetic:knowledge/eval"


def on_the_test_split(f: ResultFile) -> bool:
    """every seed measured on the test split"""
    return all(r.get("prompts") == TEST_SPLIT for r in f.data["runs"])


def on_the_tuning_split(f: ResultFile) -> bool:
    """every seed measured on the tuning split"""
    return all(r.get("prompts") == TUNING_SPLIT for r in f.data["runs"])


@region("fix-seeds")
def fix_seeds(results: Results) -> str:
    f = results.newest("fix_seeds", "cpu", where=on_the_test_split)
    return fix_table(f, f"on {f.data['settings']['cpus']} CPU cores")


def fix_runs_table(files: list[ResultFile], changes: bool = False) -> str:
    """One row per ``fix_seeds`` file: the targets judged on the means of its seeds; with ``changes``,
    also what the run changed in the recipe (its overrides, less the choice of split)."""
    metrics = list(files[0].data["targets"])
    rows = []
    for f in files:
        t = f.data["summary"]["targets"]
        changed = [o for o in f.data["settings"].get("overrides", []) if not o.startswith("stages.9.evaluate.prompts=")]
        rows.append([f"{f.when[:16]} UTC", (f.data.get("git_commit") or "no commit")[:7],
                     f"`{f.path.relative_to('benchmarks/results')}`",
                     *([", ".join(f"`{o}`" for o in changed) or "none (the committed recipe)"] if changes else []),
                     *(change(t[m]["before_mean"], t[m]["after_mean"], FIX_KINDS[m])
                       + ("" if t[m]["met_on_means"] else " (missed)") for m in metrics)])
    return table(["run", "commit", "file", *(["changes to the recipe"] if changes else []),
                  *(FIX_LABELS[m] for m in metrics)], rows)


@region("fix-seeds-runs")
def fix_seeds_runs(results: Results) -> str:
    """Every committed three-seed run of the tiny-scale recipe on the test split, the targets on
    each one's means: how far runs of one recipe land apart (on a CPU the machine's floating-point
    path is one more seed)."""
    results.newest("fix_seeds", "cpu", where=on_the_test_split)
    return fix_runs_table(results.runs("fix_seeds", "cpu", where=on_the_test_split))


@region("fix-seeds-tuning")
def fix_seeds_tuning(results: Results) -> str:
    """The same for runs on the tuning split: where a change of the recipe is judged first."""
    results.newest("fix_seeds", "cpu", where=on_the_tuning_split)
    return fix_runs_table(results.runs("fix_seeds", "cpu", where=on_the_tuning_split), changes=True)


# -- data loading (docs/practitioners.md) ---------------------------------------------------------

MIB = 2 ** 20
FORMATS = {"jsonl": "JSONL, one file", "parquet": "Parquet, {shards} shards"}


def format_label(fmt: str, settings: dict) -> str:
    shards = -(-settings["records"] // settings["shard_rows"])
    return FORMATS[fmt].format(shards=shards)


@region("dataset-load")
def dataset_load(results: Results) -> str:
    f = results.newest("dataset_streaming", "cpu")
    st = f.data["settings"]
    rows = []
    for fmt, side in f.data["sides"].items():
        per_record_kib = (side["peak_rss_mib"] - side["baseline_rss_mib"]) * 1024 / side["records_kept"]
        rows.append([format_label(fmt, st), f"{side['disk_bytes'] / MIB:,.0f} MiB", f"{side['wall_seconds'][0]:.1f} s",
                     thousands(side["records_per_second"]),
                     f"{thousands(side['peak_rss_mib'])} MiB ({thousands(side['baseline_rss_mib'])} MiB)",
                     f"{per_record_kib:.1f} KiB"])
    return (f"{thousands(st['records'])} records, {st['cpus']} CPU cores:\n\n" +
            table(["format", "on disk", "load wall time", "records/s", "peak resident memory (before loading)",
                   "peak over before, per record"], rows))


def tokenize_table(f: ResultFile) -> str:
    st = f.data["settings"]
    rows = []
    for fmt, side in f.data["sides"].items():
        tokens = side["tokens"]
        held = (side["rss_mib_holding_tokens"] - side["rss_mib_before_tokenizing"]) * MIB / tokens
        at_peak = (side["peak_rss_mib_with_tokens"] - side["peak_rss_mib"]) * MIB / tokens
        rows.append([format_label(fmt, st).split(",")[0], f"{side['wall_seconds'][0]:.1f} s",
                     f"{side['tokenize_seconds'][0]:.1f} s", f"{side['cached_tokens_seconds'][0]:.1f} s",
                     f"{tokens / 1e6:.1f}M ({tokens / side['records_tokenized']:.0f} a record)",
                     f"{thousands(side['peak_rss_mib'])} MiB", f"{thousands(side['peak_rss_mib_with_tokens'])} MiB",
                     f"{thousands(side['rss_mib_before_tokenizing'])}, "
                     f"then {thousands(side['rss_mib_holding_tokens'])} MiB",
                     f"{held:.1f}", f"{at_peak:.1f}"])
    return (f"{thousands(st['records'])} records, {st['cpus']} CPU cores:\n\n" +
            table(["format", "load", "tokenize", "again, from the cache", "tokens", "peak resident, loading alone",
                   "peak resident, tokenizing", "resident before tokenizing, then holding the tokens",
                   "bytes a held token", "bytes a token at the peak over loading's"], rows))


@region("dataset-tokenize")
def dataset_tokenize(results: Results) -> str:
    return tokenize_table(results.newest("dataset_streaming-tokenize", "cpu"))


@region("dataset-tokenize-1m")
def dataset_tokenize_1m(results: Results) -> str:
    return tokenize_table(results.newest("dataset_streaming_1m-tokenize", "cpu"))
