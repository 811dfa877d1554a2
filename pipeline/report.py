"""The evaluation report: accuracies with bootstrap intervals, per-instruction accuracy, steering
telemetry, quality guards and throughput, as ``summary.json``, ``report.md``, PNG plots and one
self-contained ``report.html`` with side-by-side examples. ``directer report RUN_DIR`` rebuilds it.
"""

from __future__ import annotations

import base64
import html
import json
from collections import Counter, defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from directer.pieces import steered_pieces
from directer.steering import STEERERS
from directer.telemetry import SteeringSummary
from pipeline.outputs import RunOutput, replacing
from pipeline.rows import user_message

METRICS = ("prompt_strict", "prompt_loose", "inst_strict", "inst_loose")
METRIC_NAMES = {
    "prompt_strict": "prompt-level strict",
    "prompt_loose": "prompt-level loose",
    "inst_strict": "instruction-level strict",
    "inst_loose": "instruction-level loose",
}
BOOTSTRAP_SAMPLES = 2000
# what the report reads of every row; the text, errors and per-step telemetry (about 125 KiB a row of 256
# steps in Python) are read only for the examples shown, and the telemetry counted in Arrow a batch at a time
ROW_COLUMNS = ["id", "status", "completion_tokens", "nll", "distinct_2", "finish_reason", "span_source"]
EXAMPLE_COLUMNS = ["status", "error", "telemetry"]


def _per_prompt(scores: list[dict], method: str) -> dict[str, dict[str, Any]]:
    """For each prompt of a method: prompt verdicts and instruction counts."""
    prompts: dict[str, dict[str, Any]] = {}
    for row in scores:
        if row["method"] != method:
            continue
        entry = prompts.setdefault(
            row["id"],
            {
                "prompt_strict": row["prompt_strict"],
                "prompt_loose": row["prompt_loose"],
                "n": 0,
                "strict": 0,
                "loose": 0,
            },
        )
        entry["n"] += 1
        entry["strict"] += row["strict"]
        entry["loose"] += row["loose"]
    return prompts


def _accuracies(prompts: dict[str, dict[str, Any]], ids: list[str], index: np.ndarray) -> np.ndarray:
    """The four accuracies over the prompts ``ids[index]``, for each row of ``index`` ([S, P])."""
    strict = np.array([prompts[i]["prompt_strict"] for i in ids], dtype=float)
    loose = np.array([prompts[i]["prompt_loose"] for i in ids], dtype=float)
    n = np.array([prompts[i]["n"] for i in ids], dtype=float)
    inst_strict = np.array([prompts[i]["strict"] for i in ids], dtype=float)
    inst_loose = np.array([prompts[i]["loose"] for i in ids], dtype=float)
    return np.stack(
        [
            strict[index].mean(-1),
            loose[index].mean(-1),
            inst_strict[index].sum(-1) / n[index].sum(-1),
            inst_loose[index].sum(-1) / n[index].sum(-1),
        ],
        axis=-1,
    )


def accuracy_table(scores: list[dict], methods: list[str], baseline: str | None) -> dict[str, dict[str, Any]]:
    """Accuracies per run, with 95% paired-bootstrap intervals of the difference to ``baseline`` (zero-shot)."""
    per_method = {m: _per_prompt(scores, m) for m in methods}
    ids = sorted(set.intersection(*(set(p) for p in per_method.values())))
    rng = np.random.default_rng(0)
    resamples = rng.integers(0, len(ids), size=(BOOTSTRAP_SAMPLES, len(ids)))
    everything = np.arange(len(ids))[None]
    table: dict[str, dict[str, Any]] = {}
    base_boot = _accuracies(per_method[baseline], ids, resamples) if baseline else None
    base_point = _accuracies(per_method[baseline], ids, everything)[0] if baseline else None
    for method in methods:
        point = _accuracies(per_method[method], ids, everything)[0]
        entry: dict[str, Any] = {"prompts": len(ids), **{m: float(v) for m, v in zip(METRICS, point)}}
        if baseline and method != baseline:
            boot = _accuracies(per_method[method], ids, resamples) - base_boot
            low, high = np.percentile(boot, [2.5, 97.5], axis=0)
            entry["diff_vs_zero_shot"] = {
                m: {"diff": float(point[k] - base_point[k]), "ci95": [float(low[k]), float(high[k])]}
                for k, m in enumerate(METRICS)
            }
        table[method] = entry
    return table


def per_instruction(scores: list[dict], methods: list[str]) -> dict[str, dict[str, float]]:
    """Instruction-level strict accuracy per instruction type and method."""
    hits: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for row in scores:
        hits[(row["instruction_id"], row["method"])].append(row["strict"])
    kinds = sorted({k for k, _ in hits})
    return {k: {m: mean(hits[(k, m)]) for m in methods if (k, m) in hits} for k in kinds}


def steering_stats(run: RunOutput) -> dict[str, Any]:
    """Share of steps steered, gate skips and fallbacks, and the accepted layer counts."""
    summaries: list[dict[str, Any]] = []
    layers: Counter[int] = Counter()
    for batch in run.batches(["status", "steering", "telemetry"]):
        ok = batch.filter(pc.and_(pc.equal(batch.column("status"), "ok"), pc.is_valid(batch.column("steering"))))
        summaries += ok.column("steering").to_pylist()
        accepted = pc.struct_field(pc.list_flatten(ok.column("telemetry")), "layers")
        for value, count in zip(*pc.value_counts(accepted.filter(pc.greater(accepted, 0))).flatten()):
            layers[value.as_py()] += count.as_py()
    total = SteeringSummary.total(summaries)
    if not total.steps:
        return {}
    return {
        "steps": total.steps,
        **total.shares(),
        "accepted_layers": {str(k): v for k, v in sorted(layers.items(), reverse=True)},
    }


def quality_stats(rows: list[dict]) -> dict[str, Any]:
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return {}

    def average(values: list) -> float | None:
        present = [v for v in values if v is not None]
        return float(mean(present)) if present else None

    return {
        "completion_tokens": average([r["completion_tokens"] for r in ok]),
        "distinct_2": average([r["distinct_2"] for r in ok]),
        "nll": average([r["nll"] for r in ok]),
        "finished_by_eos": sum(r["finish_reason"] == "stop" for r in ok) / len(ok),
        "errors": sum(r["status"] != "ok" for r in rows),
    }


def throughput(run: RunOutput) -> dict[str, float]:
    """Tokens per second over every invocation that generated, so a resumed run (whose last invocation may
    have had nothing left to do) reports the speed of the work it did."""
    invocations = (run.manifest() or {}).get("invocations", [])
    tokens = sum(i["completion_tokens"] for i in invocations)
    seconds = sum(i["seconds"].get("pipeline", 0.0) for i in invocations)
    return {
        "tokens_per_second": tokens / seconds if seconds else 0.0,
        "pipeline_seconds": seconds,
        "completion_tokens": tokens,
    }


def build_report(output: Path) -> dict[str, Any]:
    """Summarise an evaluation folder and write ``summary.json``, plots, ``report.md`` and ``report.html``."""
    output = Path(output)
    config = json.loads((output / "eval.json").read_text())
    # run label -> its steering config (one run per method, or per point of a sweep)
    variants = config.get("variants") or {m: {"method": m} for m in config["methods"]}
    methods = list(variants)
    steers = {label: STEERERS[variant["method"]].steers for label, variant in variants.items()}
    baseline = next((m for m in methods if not steers[m]), None)
    scores = pq.read_table(output / "scores.parquet").to_pylist()
    outputs = {m: RunOutput.of_method(output, m) for m in methods}
    runs = {m: run.rows(ROW_COLUMNS) for m, run in outputs.items()}
    summary = {
        "config": config,
        # how each row's instruction was given or found (the same for every method)
        "span_sources": dict(Counter(r["span_source"] for r in runs[methods[-1]] if r["status"] == "ok")),
        "accuracy": accuracy_table(scores, methods, baseline),
        "per_instruction": per_instruction(scores, methods),
        "steering": {m: steering_stats(outputs[m]) for m in methods if steers[m]},
        "quality": {m: quality_stats(runs[m]) for m in methods},
        "throughput": {m: throughput(run) for m, run in outputs.items()},
    }
    if config.get("alphas") or config.get("betas"):
        summary["sweep"] = sweep_points(summary, variants)
    with replacing(output / "summary.json") as partial:
        partial.write_text(json.dumps(summary, indent=2))
    plots = _plots(output, summary, runs, methods)
    pages = {
        "report.md": _markdown(summary, plots, methods),
        "report.html": _html(output, summary, plots, runs, outputs, scores, methods),
    }
    for name, text in pages.items():
        with replacing(output / name) as partial:
            partial.write_text(text)
    return summary


def sweep_points(summary: dict, variants: dict[str, dict]) -> list[dict[str, Any]]:
    """One entry per run of a sweep: its method, alpha, beta, accuracies and quality guards."""
    return [
        {
            "label": label,
            "method": variant["method"],
            "alpha": variant.get("alpha") if "alpha" in STEERERS[variant["method"]].fields else None,
            "beta": variant.get("beta") if "beta" in STEERERS[variant["method"]].fields else None,
            **{m: summary["accuracy"][label][m] for m in METRICS},
            "nll": summary["quality"][label].get("nll"),
            "distinct_2": summary["quality"][label].get("distinct_2"),
        }
        for label, variant in variants.items()
    ]


def _sweep_plots(output: Path, points: list[dict], plt) -> dict[str, Path]:
    """Per swept method, heatmaps over alpha x beta: prompt-level strict accuracy and the quality guards."""
    plots = {}
    for method in dict.fromkeys(p["method"] for p in points):
        mine = [p for p in points if p["method"] == method]
        alphas, betas = [sorted({p[f] for p in mine}, key=lambda v: v or 0) for f in ("alpha", "beta")]
        if len(mine) < 2:
            continue
        figure, axes = plt.subplots(1, 3, figsize=(10, 3.2))
        for axis, (field, title) in zip(
            axes, (("prompt_strict", "prompt-level strict"), ("nll", "mean NLL"), ("distinct_2", "distinct-2"))
        ):
            grid = np.full((len(alphas), len(betas)), np.nan)
            for p in mine:
                grid[alphas.index(p["alpha"]), betas.index(p["beta"])] = np.nan if p[field] is None else p[field]
            image = axis.imshow(grid, cmap="viridis", aspect="auto")
            for (i, j), value in np.ndenumerate(grid):
                axis.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=7, color="white")
            axis.set_xticks(range(len(betas)), ["-" if b is None else f"{b:g}" for b in betas])
            axis.set_yticks(range(len(alphas)), ["-" if a is None else f"{a:g}" for a in alphas])
            axis.set_xlabel("beta")
            axis.set_ylabel("alpha")
            axis.set_title(title, fontsize=9)
            figure.colorbar(image, ax=axis, fraction=0.046)
        figure.suptitle(f"{method}: sweep")
        plots[f"sweep_{method}"] = _save(figure, output / f"sweep_{method.replace('+', '_')}.png")
    return plots


def _plots(output: Path, summary: dict, runs: dict[str, list[dict]], methods: list[str]) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"zero-shot": "#8c8c8c", "directer": "#d9541e"}
    plots: dict[str, Path] = {}

    figure, axis = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(methods)
    for k, method in enumerate(methods):
        values = [summary["accuracy"][method][m] for m in METRICS]
        axis.bar(np.arange(4) + k * width, values, width, label=method, color=colors.get(method))
    axis.set_xticks(np.arange(4) + width * (len(methods) - 1) / 2, [METRIC_NAMES[m] for m in METRICS], fontsize=8)
    axis.set_ylim(0, 1)
    axis.set_ylabel("accuracy")
    axis.legend()
    axis.set_title("IFEval accuracy")
    plots["accuracy"] = _save(figure, output / "accuracy.png")

    kinds = list(summary["per_instruction"])
    figure, axis = plt.subplots(figsize=(7, max(3, 0.28 * len(kinds))))
    height = 0.8 / len(methods)
    for k, method in enumerate(methods):
        values = [summary["per_instruction"][kind].get(method, 0.0) for kind in kinds]
        axis.barh(np.arange(len(kinds)) + k * height, values, height, label=method, color=colors.get(method))
    axis.set_yticks(np.arange(len(kinds)) + height * (len(methods) - 1) / 2, kinds, fontsize=7)
    axis.set_xlim(0, 1)
    axis.set_xlabel("instruction-level strict accuracy")
    axis.invert_yaxis()
    axis.legend(fontsize=8)
    plots["per_instruction"] = _save(figure, output / "per_instruction.png")

    for method, stats in summary["steering"].items():
        if not stats:
            continue
        figure, axis = plt.subplots(figsize=(5, 3))
        labels = list(stats["accepted_layers"])
        axis.bar(labels, [stats["accepted_layers"][label] for label in labels], color=colors.get(method))
        axis.set_xlabel("layers steered when a steered token was accepted")
        axis.set_ylabel("steps")
        axis.set_title(f"{method}: accepted layer counts")
        plots[f"layers_{method}"] = _save(figure, output / f"layers_{method}.png")

    figure, axes = plt.subplots(1, 3, figsize=(9, 3))
    for axis, (field, label) in zip(
        axes, (("completion_tokens", "tokens"), ("nll", "mean NLL"), ("distinct_2", "distinct-2"))
    ):
        data = [[r[field] for r in runs[m] if r["status"] == "ok" and r[field] is not None] for m in methods]
        axis.boxplot(data, tick_labels=methods)
        axis.set_title(label, fontsize=9)
    figure.suptitle("quality guards")
    plots["quality"] = _save(figure, output / "quality.png")
    if "sweep" in summary:
        plots.update(_sweep_plots(output, summary["sweep"], plt))
    return plots


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path


def accuracy_cells(summary: dict, methods: list[str]) -> list[list[str]]:
    rows = []
    for method in methods:
        entry = summary["accuracy"][method]
        cells = [method]
        for metric in METRICS:
            cell = f"{entry[metric]:.3f}"
            diff = entry.get("diff_vs_zero_shot", {}).get(metric)
            if diff:
                cell += f" ({diff['diff']:+.3f}, 95% CI {diff['ci95'][0]:+.3f} to {diff['ci95'][1]:+.3f})"
            cells.append(cell)
        rows.append(cells)
    return rows


def _markdown(summary: dict, plots: dict[str, Path], methods: list[str]) -> str:
    config = summary["config"]
    lines = [
        "# Evaluation report",
        "",
        f"Benchmark `{config['benchmark']}`, model `{config['model']}`, spans `{config['spans']}` "
        f"({_span_sources(summary)}), "
        f"{summary['accuracy'][methods[0]]['prompts']} prompts, max new tokens {config['steering']['max_new_tokens']}.",
        "",
        "## Accuracy (difference to zero-shot, 95% paired-bootstrap interval)",
        "",
        "| method | " + " | ".join(METRIC_NAMES[m] for m in METRICS) + " |",
        "| --- |" + " --- |" * len(METRICS),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in accuracy_cells(summary, methods)]
    lines += ["", f"![accuracy]({plots['accuracy'].name})", "", "## Per instruction type", ""]
    lines += [f"![per instruction]({plots['per_instruction'].name})", "", "## Steering", ""]
    for method, stats in summary["steering"].items():
        if stats:
            lines.append(
                f"- {method}: {stats['steered_share']:.1%} of steps steered ({stats['changed_share']:.1%} changed the "
                f"token), {stats['gate_skip_share']:.1%} skipped by the gate, {stats['fallback_share']:.1%} fell back; "
                f"{stats['steered_passes_per_step']:.2f} steered passes per step; accepted layer counts "
                f"{stats['accepted_layers']}"
            )
            lines += ["", f"![layers]({plots[f'layers_{method}'].name})"]
    lines += [
        "",
        "## Quality guards and throughput",
        "",
        "| method | tokens | distinct-2 | mean NLL | ended by EOS | errors | tokens/s |",
        "| --- |" + " --- |" * 6,
    ]
    for method in methods:
        q, t = summary["quality"].get(method, {}), summary["throughput"].get(method, {})
        lines.append(
            f"| {method} | {_fmt(q.get('completion_tokens'), 1)} | {_fmt(q.get('distinct_2'))} | "
            f"{_fmt(q.get('nll'))} | {_fmt(q.get('finished_by_eos'))} | {q.get('errors', 0)} | "
            f"{_fmt(t.get('tokens_per_second'), 1)} |"
        )
    lines += ["", f"![quality]({plots['quality'].name})", ""]
    if "sweep" in summary:
        header = "| run | alpha | beta | prompt-level strict | prompt-level loose | mean NLL | distinct-2 |"
        lines += ["## Sweep", "", header, "| --- |" + " --- |" * 6]
        for p in summary["sweep"]:
            lines.append(
                f"| {p['label']} | {_fmt(p['alpha'], 0)} | {_fmt(p['beta'], 2)} | {p['prompt_strict']:.3f} | "
                f"{p['prompt_loose']:.3f} | {_fmt(p['nll'])} | {_fmt(p['distinct_2'])} |"
            )
        lines += ["", *[f"![{name}]({path.name})" for name, path in plots.items() if name.startswith("sweep_")], ""]
    return "\n".join(lines)


def _span_sources(summary: dict) -> str:
    """``instruction_spans 40, none 1``: how the rows' instructions were given or found."""
    counts = summary.get("span_sources", {})
    return "rows by span source: " + ", ".join(f"{name} {count}" for name, count in sorted(counts.items()))


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{path.stem}" src="data:image/png;base64,{data}">'


def _highlighted_completion(tokenizer, row: dict) -> str:
    """The completion with every token that steering changed highlighted."""
    if row["status"] != "ok":
        return f'<span class="error">{html.escape(row["error"] or "")}</span>'
    steps = ((step["token"], step["changed"]) for step in row["telemetry"] or [])
    return "".join(
        f'<mark title="steered">{html.escape(piece)}</mark>' if changed else html.escape(piece)
        for piece, changed in steered_pieces(tokenizer, steps)
    )


def _example_prompt(row: dict) -> str:
    """The row's user message, its character spans marked where they refer to it."""
    if row.get("prompt"):
        return _marked_prompt(row["prompt"], row.get("instruction_spans"))
    return html.escape(user_message(row))


def _marked_prompt(prompt: str, spans: list) -> str:
    parts, last = [], 0
    for start, end in sorted(spans or []):
        parts += [html.escape(prompt[last:start]), f'<span class="span">{html.escape(prompt[start:end])}</span>']
        last = end
    return "".join(parts + [html.escape(prompt[last:])])


def _html(
    output: Path, summary: dict, plots: dict[str, Path], runs: dict, outputs: dict[str, RunOutput],
    scores: list[dict], methods: list[str],
) -> str:  # fmt: skip
    from directer.models import load_tokenizer

    config = summary["config"]
    tokenizer = load_tokenizer(config["model"], trust_remote_code=config.get("trust_remote_code", False))
    sweeps = "sweep" in summary
    by_method = {m: {r["id"] for r in runs[m]} for m in methods}
    verdicts: dict[tuple[str, str], list[tuple[str, bool]]] = defaultdict(list)
    for row in scores:
        verdicts[(row["method"], row["id"])].append((row["instruction_id"], row["strict"]))
    ids = sorted(set.intersection(*by_method.values()))
    differing = [i for i in ids if len({all(v for _, v in verdicts[(m, i)]) for m in methods}) > 1]
    chosen = (differing + [i for i in ids if i not in differing])[:12]
    shown = {m: {r["id"]: r for r in outputs[m].rows_with_ids(chosen, EXAMPLE_COLUMNS)} for m in methods}
    inputs = {r["id"]: r for r in pq.read_table(output / "inputs.parquet", filters=[("id", "in", chosen)]).to_pylist()}

    head = "".join(f"<th>{METRIC_NAMES[m]}</th>" for m in METRICS)
    table = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
        for row in accuracy_cells(summary, methods)
    )
    examples = []
    for row_id in chosen:
        cells = []
        for method in methods:
            marks = " ".join(
                f'<span class="{"pass" if ok else "fail"}">{html.escape(k)}</span>'
                for k, ok in verdicts[(method, row_id)]
            )
            completion = _highlighted_completion(tokenizer, shown[method][row_id])
            cells.append(f"<td><div class='verdicts'>{marks}</div><pre>{completion}</pre></td>")
        source = inputs[row_id]
        examples.append(
            f"<h3>{html.escape(row_id)}</h3>"
            f"<p class='prompt'>{_example_prompt(source)}</p>"
            f"<table class='side'><tr>{''.join(f'<th>{m}</th>' for m in methods)}</tr><tr>{''.join(cells)}</tr></table>"
        )
    steering = "".join(
        f"<li>{html.escape(m)}: {s['steered_share']:.1%} of steps steered, {s['gate_skip_share']:.1%} gate skips, "
        f"{s['fallback_share']:.1%} fallbacks</li>{_image(plots[f'layers_{m}'])}"
        for m, s in summary["steering"].items()
        if s
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>directer evaluation</title><style>
body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top}}
td{{overflow-wrap:anywhere}}
table.side{{width:100%;table-layout:fixed}} pre{{white-space:pre-wrap;overflow-wrap:anywhere;font-size:13px;margin:0}}
mark{{background:#ffd54f}} .span{{background:#cfe8ff;border-bottom:2px solid #3b82f6}}
.pass,.fail{{font-size:11px;padding:1px 4px;border-radius:3px;margin-right:3px}}
.pass{{background:#c8f7c5}} .fail{{background:#f9c0c0}}
.error{{color:#b00}} .prompt{{background:#f6f6f6;padding:8px}} img{{max-width:100%}}
</style></head><body>
<h1>Evaluation: {html.escape(config["benchmark"])}</h1>
<p>Model <code>{html.escape(config["model"])}</code>, spans <code>{html.escape(config["spans"])}</code>
({html.escape(_span_sources(summary))}),
{summary["accuracy"][methods[0]]["prompts"]} prompts, max new tokens {config["steering"]["max_new_tokens"]}.</p>
<h2>Accuracy</h2><p>Difference to zero-shot with a 95% paired-bootstrap interval.</p>
<table><tr><th>method</th>{head}</tr>{table}</table>{_image(plots["accuracy"])}
<h2>Per instruction type</h2>{_image(plots["per_instruction"])}
<h2>Steering</h2><ul>{steering}</ul>
<h2>Quality guards</h2>{_image(plots["quality"])}
{"<h2>Sweep</h2>" + "".join(_image(p) for n, p in plots.items() if n.startswith("sweep_")) if sweeps else ""}
<h2>Examples</h2><p>Instruction spans are <span class="span">marked</span> in the prompt; tokens that
steering changed are <mark>highlighted</mark>; verdicts are IFEval's strict checks.</p>
{"".join(examples)}
</body></html>"""
