"""What structured output costs: the mixed-adapter workload with half its requests held to a JSON schema.

One process, one run, one engine (the default model and config), the workload of ``engine_throughput.py``
(48 requests, 16 per adapter endpoint, prompts of 16-256 tokens cut from Python standard-library source,
16-128 output tokens, greedy, EOS ignored, all submitted at once):

    unconstrained   the workload as it is: every request produces exactly its ``max_tokens``
    constrained     the same requests, every other one (in arrival order) with ``guide`` = a JSON schema
                    (``SCHEMA``: strings with maxLength, an enum, a bounded integer, an array with maxItems);
                    a constrained request ends when its JSON closes, or at its ``max_tokens``

    same lengths    the unconstrained workload with each request's ``max_tokens`` set to the number of tokens
                    it produced in the first constrained run: the same requests producing the same numbers of
                    tokens, unconstrained. Its throughput is the target's baseline ("the same workload")

The three alternate for ``--rounds`` rounds (the order rotates every round). Constrained requests end earlier,
so the later steps of the constrained run hold fewer rows than the unconstrained run's: tokens per second
against the full-length run mixes the masks' cost with a smaller batch at the end (reported too, as
``ratios_full_length``). Besides tokens per second the run reports the wall time of each ``engine.step()``
and compares the constrained run's decode steps with the full-length run's steps of the same batch size (the
"decode step ratio": 1.0 means the masks cost nothing).

The masks are timed by wrapping, on the engine instance, ``runner.prepare_inputs`` (rows per step),
``runner.execute`` (when the forward ended), ``grammars._fill`` (the mask fill on the worker thread, and the
part of it still running after the forward: what the step waited for) and each step's ``Masks.apply``; no
engine code changes.

Compile times: the first use of a guide on a new engine (the vocabulary scan, then the schema), then
``--compile-trials`` schemas never seen before (``SCHEMA`` with a renamed property) each compiled twice:
first use against cached.

Every constrained output that ended with "stop" must parse and validate against the schema (jsonschema);
failures are listed in the JSON and make the script exit 1 after writing it.

    python benchmarks/structured_output.py                  # full run, results in benchmarks/results/
    python benchmarks/structured_output.py --quick --out /tmp/so   # 4 short requests, one round
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from benchmarks.harness import cli, report
from benchmarks.harness.cli import log
from benchmarks.harness.engine import check_counts, engine_config
from benchmarks.harness.machine import load_average, machine_description, source_revision
from benchmarks.harness.stats import summary
from benchmarks.harness.workload import FULL, BenchRequest, WorkloadSpec, describe_workload, make_workload
from loraplex.engine.core.engine import LLMEngine, RequestOutput
from loraplex.engine.core.sequence import FinishReason, Guide, GuideKind, Request, SamplingParams

QUICK = WorkloadSpec(num_requests=4, prompt_len=(16, 48), output_len=(4, 12))
TARGET_RATIO = 0.9  # issue 22: constrained throughput at least 0.9x the same workload unconstrained


def schema(title_key: str = "title") -> dict:
    """A record a client might ask a model to fill in; every field is bounded, so an answer ends."""
    return {
        "type": "object",
        "properties": {
            title_key: {"type": "string", "maxLength": 32},
            "language": {"type": "string", "enum": ["python", "c", "javascript", "other"]},
            "difficulty": {"type": "integer", "minimum": 1, "maximum": 5},
            "topics": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
            "summary": {"type": "string", "maxLength": 80},
        },
        "required": [title_key, "language", "difficulty", "topics", "summary"],
        "additionalProperties": False,
    }


SCHEMA = schema()


def json_schema_guide(schema_dict: dict) -> Guide:
    return Guide(GuideKind.JSON_SCHEMA, json.dumps(schema_dict))


# ---- one run of the workload, step by step -----------------------------------------------------------------


@dataclass
class StepRecord:
    seconds: float = 0.0  # wall time of engine.step()
    rows: int = 0  # sequences sampled
    tokens: int = 0  # tokens computed (prompt chunks and decode tokens)
    guided_rows: int = 0
    fill_seconds: float = 0.0  # the masks' fill on the worker thread
    apply_seconds: float = 0.0  # the masks applied to the logits, in the sampler
    forward_end: float = 0.0
    fill_end: float = 0.0

    @property
    def is_decode(self) -> bool:
        return self.rows > 0 and self.tokens == self.rows

    @property
    def exposed_fill_seconds(self) -> float:
        """How long the fill ran past the forward: what the step waited for."""
        return max(0.0, self.fill_end - self.forward_end) if self.guided_rows else 0.0


class StepProbe:
    """Fills a StepRecord per step by wrapping the engine instance's runner and grammar filler."""

    def __init__(self, engine: LLMEngine) -> None:
        self.record = StepRecord()
        runner, grammars = engine.runner, engine.grammars
        prepare_inputs, execute, fill = runner.prepare_inputs, runner.execute, grammars._fill

        def probed_prepare_inputs(chunks: list) -> object:
            inputs = prepare_inputs(chunks)
            self.record.rows = len(inputs.sampled_chunks)
            self.record.tokens = sum(c.num_tokens for c in inputs.chunks)
            return inputs

        def probed_execute(inputs: object) -> object:
            out = execute(inputs)
            self.record.forward_end = time.perf_counter()
            return out

        def probed_fill(matchers: list, rows: list[int]) -> object:
            record, start = self.record, time.perf_counter()
            masks = fill(matchers, rows)
            record.fill_end = time.perf_counter()
            record.fill_seconds, record.guided_rows = record.fill_end - start, len(rows)
            apply = masks.apply

            def probed_apply(logits: torch.Tensor) -> None:
                start = time.perf_counter()
                apply(logits)
                record.apply_seconds = time.perf_counter() - start

            masks.apply = probed_apply
            return masks

        runner.prepare_inputs, runner.execute, grammars._fill = probed_prepare_inputs, probed_execute, probed_fill

    def step(self, engine: LLMEngine) -> tuple[list[RequestOutput], StepRecord]:
        self.record = record = StepRecord()
        start = time.perf_counter()
        outputs = engine.step()
        record.seconds = time.perf_counter() - start
        return outputs, record


@dataclass
class RunResult:
    name: str
    tokens: int
    seconds: float
    steps: list[StepRecord] = field(repr=False)
    outputs: dict[str, list[int]] = field(repr=False)  # request id -> token ids
    texts: dict[str, str] = field(repr=False)
    finish_reasons: dict[str, str] = field(repr=False)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def summary(self) -> dict:
        decode = [s for s in self.steps if s.is_decode]
        return {
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "steps": len(self.steps),
            "mean_step_ms": round(1e3 * self.seconds / len(self.steps), 2),
            "decode_steps": len(decode),
            "median_decode_step_ms": round(1e3 * statistics.median(s.seconds for s in decode), 2) if decode else None,
            "mean_rows_per_decode_step": round(statistics.fmean(s.rows for s in decode), 1) if decode else None,
        }


def run_workload(
    engine: LLMEngine, probe: StepProbe, workload: list[BenchRequest], guides: dict[str, Guide], name: str
) -> RunResult:
    """Submit every request at once (``guides``: request id -> its guide) and step the engine until all finish."""
    engine.block_manager.reset_prefix_cache()  # a replayed workload must not reuse the previous run's K/V
    for r in workload:
        params = SamplingParams(r.max_tokens, ignore_eos=True, guide=guides.get(r.request_id))
        engine.add_request(Request(r.request_id, r.endpoint, list(r.prompt_token_ids), params))
    results: dict[str, list[RequestOutput]] = {r.request_id: [] for r in workload}
    steps: list[StepRecord] = []
    start = time.perf_counter()
    while engine.has_unfinished():
        outputs, record = probe.step(engine)
        steps.append(record)
        for out in outputs:
            results[out.request_id].append(out)
    seconds = time.perf_counter() - start
    errors = [outs[-1].error for outs in results.values() if outs[-1].finish_reason is FinishReason.ERROR]
    if errors:
        raise RuntimeError(f"{name}: {len(errors)} requests failed in the engine: {errors[0]}")
    outputs = {rid: [t for out in outs for t in out.new_token_ids] for rid, outs in results.items()}
    free = [r for r in workload if r.request_id not in guides]
    check_counts(name, free, outputs)  # an unconstrained request always runs to its max_tokens
    return RunResult(
        name=name,
        tokens=sum(len(tokens) for tokens in outputs.values()),
        seconds=seconds,
        steps=steps,
        outputs=outputs,
        texts={rid: "".join(out.text_delta for out in outs) for rid, outs in results.items()},
        finish_reasons={rid: outs[-1].finish_reason.value for rid, outs in results.items()},
    )


# ---- comparisons -----------------------------------------------------------------------------------------------


def decode_step_ratio(constrained: RunResult, unconstrained: RunResult) -> float | None:
    """The constrained run's decode steps against unconstrained decode steps of the same batch sizes:
    sum of their wall times / sum of the unconstrained run's median step at each one's size."""
    by_rows: dict[int, list[float]] = {}
    for s in unconstrained.steps:
        if s.is_decode:
            by_rows.setdefault(s.rows, []).append(s.seconds)
    medians = {rows: statistics.median(times) for rows, times in by_rows.items()}
    matched = [s for s in constrained.steps if s.is_decode and s.rows in medians]
    if not matched:
        return None
    return sum(s.seconds for s in matched) / sum(medians[s.rows] for s in matched)


def check_constrained(run: RunResult, guided: list[str], schema_dict: dict) -> dict:
    """Every constrained output that ended with "stop" parses and validates; counts by finish reason."""
    failures = []
    for rid in guided:
        if run.finish_reasons[rid] != FinishReason.STOP.value:
            continue
        try:
            jsonschema.validate(json.loads(run.texts[rid]), schema_dict)
        except (json.JSONDecodeError, jsonschema.ValidationError) as e:
            failures.append({"request_id": rid, "error": str(e).splitlines()[0], "text": run.texts[rid]})
    reasons = [run.finish_reasons[rid] for rid in guided]
    stopped = reasons.count(FinishReason.STOP.value)
    return {
        "constrained_requests": len(guided),
        "finished_stop": stopped,
        "finished_length": reasons.count(FinishReason.LENGTH.value),
        "valid_of_stop": f"{stopped - len(failures)}/{stopped}",
        "failures": failures,
    }


def mask_costs(runs: list[RunResult]) -> dict:
    """The masks' fill (per row, and per step), the part of it the step waited for, and their apply."""
    steps = [s for run in runs for s in run.steps if s.guided_rows]
    return {
        "steps_with_masks": len(steps),
        "guided_rows_per_step": summary([s.guided_rows for s in steps], scale=1),
        "fill_us_per_row": summary([s.fill_seconds / s.guided_rows for s in steps], scale=1e6),
        "fill_ms_per_step": summary([s.fill_seconds for s in steps]),
        "fill_ms_past_forward_per_step": summary([s.exposed_fill_seconds for s in steps]),
        "apply_ms_per_step": summary([s.apply_seconds for s in steps]),
        "step_ms_with_masks": summary([s.seconds for s in steps]),
        "note": "fill runs on the grammar worker thread during the forward; fill_ms_past_forward is the part of "
        "it that ran on after the forward had finished, which the step waited for; apply is in the sampler",
    }


# ---- compile times ---------------------------------------------------------------------------------------------


def time_call(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def first_use_on_new_engine(engine: LLMEngine) -> dict:
    """The engine's first guide: the vocabulary scan (once per engine), then the schema's compile."""
    grammars = engine.grammars
    scan = time_call(lambda: grammars.compiler)
    first = time_call(lambda: grammars.compile(json_schema_guide(SCHEMA)))
    return {
        "vocabulary_scan_ms": round(1e3 * scan, 2),
        "first_schema_compile_ms": round(1e3 * first, 3),
        "first_use_total_ms": round(1e3 * (scan + first), 2),
    }


def compile_times(engine: LLMEngine, trials: int) -> dict:
    """Schemas never compiled before (``SCHEMA`` with the title property renamed), each compiled twice."""
    new, cached = [], []
    for i in range(trials):
        guide = json_schema_guide(schema(f"title_{i}"))
        new.append(time_call(lambda guide=guide: engine.grammars.compile(guide)))
        cached.append(time_call(lambda guide=guide: engine.grammars.compile(guide)))
    new_ms, cached_ms = summary(new), summary(cached)
    return {
        "new_schema_ms": new_ms,
        "cached_schema_ms": cached_ms,
        "new_over_cached": round(new_ms["median"] / cached_ms["median"], 1),
    }


# ---- the run ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.parser(__doc__, f"{QUICK}, 1 round, 3 compile trials")
    parser.add_argument("--rounds", type=int, help="alternating unconstrained / constrained rounds (default 3)")
    parser.add_argument("--compile-trials", type=int, help="new schemas compiled, each then again cached (20)")
    return cli.parse(parser, argv, full={"rounds": 3, "compile_trials": 20}, quick={"rounds": 1, "compile_trials": 3})


def markdown(data: dict) -> str:
    runs = data["runs"]
    lines = [
        "| run (median round) | tok/s | output tokens | steps | mean step ms | median decode step ms | rows / step |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in runs:
        r = runs[name]
        lines.append(
            f"| {name} | {r['tokens_per_s']} | {r['tokens']} | {r['steps']} | {r['mean_step_ms']} "
            f"| {r['median_decode_step_ms']} | {r['mean_rows_per_decode_step']} |"
        )
    ratio, step_ratio, compiles = data["ratios"], data["decode_step_ratio"], data["compile"]
    masks, check = data["masks"], data["constrained_outputs"]
    lines += [
        "",
        f"- throughput, constrained / unconstrained with the same output lengths: {ratio['median']} (rounds: "
        f"{ratio['per_round']}; target >= {TARGET_RATIO}: {'met' if ratio['median'] >= TARGET_RATIO else 'missed'})",
        f"- throughput, constrained / unconstrained at full length: {data['ratios_full_length']['median']} "
        f"(rounds: {data['ratios_full_length']['per_round']})",
        f"- decode step at equal batch size, constrained / unconstrained: {step_ratio['median']} "
        f"(rounds: {step_ratio['per_round']})",
        f"- schema compile: new {compiles['new_schema_ms']['median']} ms, cached "
        f"{compiles['cached_schema_ms']['median']} ms (medians of {compiles['new_schema_ms']['n']}); first guide "
        f"on a new engine: vocabulary scan {compiles['vocabulary_scan_ms']} ms + compile "
        f"{compiles['first_schema_compile_ms']} ms",
        f"- masks: fill {masks['fill_us_per_row']['median']} µs per row, {masks['fill_ms_per_step']['median']} ms "
        f"per step on the worker thread, of which {masks['fill_ms_past_forward_per_step']['median']} ms past the "
        f"forward (median); apply {masks['apply_ms_per_step']['median']} ms per step",
        f"- constrained outputs: {check['finished_stop']} ended with stop, {check['finished_length']} at max_tokens; "
        f"valid JSON for the schema: {check['valid_of_stop']}",
    ]
    return "\n".join(lines)


def run_benchmark(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    config, threads = engine_config(args)
    machine = machine_description(threads)
    engine = LLMEngine(config)
    first_use = first_use_on_new_engine(engine)
    log(f"first guide on a new engine: {first_use}")

    spec = dataclasses.replace(QUICK if args.quick else FULL, seed=args.seed)
    adapters = [e.name for e in config.endpoints if e.adapter]
    workload = make_workload(engine.tokenizer, adapters, spec)
    guide = json_schema_guide(SCHEMA)
    guided = [r.request_id for r in workload[1::2]]
    guides = dict.fromkeys(guided, guide)
    probe = StepProbe(engine)
    warm = [dataclasses.replace(r, request_id=f"warm-{i}", max_tokens=4) for i, r in enumerate(workload[:4])]
    run_workload(engine, probe, warm, {r.request_id: guide for r in warm[1::2]}, "warm-up")

    log("constrained, for its output lengths")
    lengths = run_workload(engine, probe, workload, guides, "constrained").outputs
    same_lengths = [dataclasses.replace(r, max_tokens=len(lengths[r.request_id])) for r in workload]
    plans = {
        "unconstrained": (workload, {}),
        "constrained": (workload, guides),
        "same lengths": (same_lengths, {}),
    }
    rounds: list[dict[str, RunResult]] = []
    for i in range(args.rounds):
        order = list(plans)[i % 3 :] + list(plans)[: i % 3]
        runs = {}
        for name in order:
            log(f"{name} (round {i + 1} of {args.rounds})")
            runs[name] = run_workload(engine, probe, *plans[name], name)
        rounds.append(runs)
    compiles = {**first_use, **compile_times(engine, args.compile_trials)}

    throughput = [r["constrained"].tokens_per_s / r["same lengths"].tokens_per_s for r in rounds]
    full_length = [r["constrained"].tokens_per_s / r["unconstrained"].tokens_per_s for r in rounds]
    step_ratios = [decode_step_ratio(r["constrained"], r["unconstrained"]) for r in rounds]
    step_ratios = [round(x, 3) for x in step_ratios if x is not None]
    first = rounds[0]
    free = [r.request_id for r in workload[0::2]]
    same_free = sum(first["constrained"].outputs[rid] == first["unconstrained"].outputs[rid] for rid in free)
    check = check_constrained(first["constrained"], guided, SCHEMA)
    check["failures"] = [f for r in rounds for f in check_constrained(r["constrained"], guided, SCHEMA)["failures"]]
    check["same_tokens_every_round"] = all(r["constrained"].outputs == first["constrained"].outputs for r in rounds)
    check["unconstrained_half_same_tokens_as_unconstrained_run"] = f"{same_free}/{len(free)}"
    check["examples"] = [first["constrained"].texts[rid] for rid in guided[:3]]
    runs_json = {}
    for name in plans:
        per_round = [r[name] for r in rounds]
        median_run = sorted(per_round, key=lambda r: r.tokens_per_s)[len(per_round) // 2]
        runs_json[name] = {
            **median_run.summary(),
            "tokens_per_s_per_round": [round(r.tokens_per_s, 2) for r in per_round],
        }
    data = {
        "benchmark": "structured_output",
        "machine": machine,
        "source": source_revision(),
        "model": {"name": engine.model_name, "dtype": config.model.dtype, "device": config.model.device},
        "engine_limits": dataclasses.asdict(config.limits),
        "workload": {
            **describe_workload(workload, spec),
            "constrained": f"every other request in arrival order ({len(guided)} of {len(workload)}), greedy, "
            "EOS ignored (a constrained request ends when its JSON closes)",
        },
        "schema": SCHEMA,
        "settings": {"rounds": args.rounds, "compile_trials": args.compile_trials, "quick": args.quick},
        "runs": runs_json,
        "ratios": {
            "median": round(statistics.median(throughput), 3),
            "per_round": [round(x, 3) for x in throughput],
            "what": "constrained tokens/s over the same-lengths run's tokens/s (the same requests producing the "
            "same numbers of tokens, unconstrained), same round",
        },
        "ratios_full_length": {
            "median": round(statistics.median(full_length), 3),
            "per_round": [round(x, 3) for x in full_length],
            "what": "constrained tokens/s over the full-length unconstrained run's, same round: its requests "
            "produce more tokens, with more rows in its last steps",
        },
        "decode_step_ratio": {
            "median": round(statistics.median(step_ratios), 3) if step_ratios else None,
            "per_round": step_ratios,
            "what": "wall time of the constrained run's decode steps over the same round's unconstrained median "
            "decode step at each one's batch size (1.0 = the masks cost nothing)",
        },
        "masks": mask_costs([r["constrained"] for r in rounds]),
        "compile": compiles,
        "constrained_outputs": check,
        "targets": [
            {
                "target": f"constrained throughput >= {TARGET_RATIO}x the same workload unconstrained (median "
                "of rounds)",
                "measured": round(statistics.median(throughput), 3),
                "met": statistics.median(throughput) >= TARGET_RATIO,
            }
        ],
        "load_average_at_end": load_average(),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    data["table"] = markdown(data)
    title = (
        f"{engine.model_name} {config.model.dtype}, {len(workload)} requests ({', '.join(adapters)}), "
        f"{len(guided)} constrained by a JSON schema — {machine['cpu_model']}, {threads} threads"
    )
    text = f"# Structured output\n\n{title}\n\n{data['table']}\n\nDetails: structured_output.json.\n"
    report.write(args.out, "structured_output", data, text)
    return data


def main(argv: list[str] | None = None) -> dict:
    data = run_benchmark(parse_args(argv))
    failures = data["constrained_outputs"]["failures"]
    if failures:
        raise SystemExit(f"{len(failures)} constrained outputs do not validate: {failures[0]}")
    return data


if __name__ == "__main__":
    main()
