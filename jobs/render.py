"""What the commands print: tables and highlighted completions, built apart from the commands (Rich)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
from rich.console import Group
from rich.table import Table
from rich.text import Text

from directer.pieces import steered_pieces
from pipeline.outputs import RunOutput


def marked_spans(prompt: str, spans: list[tuple[int, int]]) -> Text:
    """``prompt`` with its instruction spans highlighted."""
    text = Text(prompt)
    for start, end in spans:
        text.stylize("bold black on yellow", start, end)
    return text


def highlight_steered(tokenizer, completion) -> Text:
    """The completion with every token that steering changed highlighted."""
    text = Text()
    for piece, changed in steered_pieces(tokenizer, ((step.token, step.changed) for step in completion.telemetry)):
        text.append(piece, style="bold black on yellow" if changed else None)
    return text


def summary_line(completion) -> str:
    summary = asdict(completion.summary)
    return (
        f"{summary['steps']} steps: {summary['steered']} steered ({summary['changed']} changed the token), "
        f"{summary['gate_skips']} skipped by the gate, {summary['fallbacks']} fell back; "
        f"{summary['trials']} steered passes, mean layers when steered {summary['mean_layers']:.1f}; "
        f"finish: {completion.finish_reason}"
    )


def comparison(tokenizer, baseline: str, steered: str, results: dict[str, Any]) -> Table:
    """Two methods' completions side by side, the steered one highlighted."""
    table = Table(title=f"{baseline} vs {steered}", show_lines=True, expand=True)
    table.add_column(baseline)
    table.add_column(f"{steered} (steered tokens highlighted)")
    table.add_row(Text(results[baseline].text), highlight_steered(tokenizer, results[steered]))
    return table


def generate_report(report) -> Table:
    """``directer generate``'s summary: rows, tokens, time, steering, cache, first errors."""
    table = Table(title=f"directer generate -> {report.output}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row(
        "rows",
        f"{report.rows} written ({report.ok} ok, {report.errors} error), {report.skipped} already done"
        # error rows of the run's own failures (out of memory, say), run again
        + (f", {report.retried} retried" if report.retried else ""),
    )
    table.add_row("tokens", f"{report.completion_tokens} generated, {report.tokens_per_second:.1f} tokens/s")
    seconds = report.seconds
    table.add_row(
        "time", f"{seconds.get('total', 0):.1f}s (start-up {seconds.get('startup', 0):.1f}s, "
        f"pipeline {seconds.get('pipeline', 0):.1f}s)"
    )  # fmt: skip
    if report.steering.get("steps"):
        s = report.steering
        table.add_row(
            "steering",
            f"{s['steered']}/{s['steps']} steps steered ({s['changed']} changed the token), "
            f"{s['gate_skips']} gate skips, {s['fallbacks']} fallbacks, mean layers {s['mean_layers']:.1f}",
        )
    if report.ranking_cache:
        table.add_row("ranking cache", f"{report.ranking_cache['hits']} hits, {report.ranking_cache['misses']} misses")
    for message in report.error_examples:
        table.add_row("[red]error[/]", message)
    return table


def examples(output: Path, method: str, count: int) -> Table | None:
    """A few finished rows of a run: the prompt with its instruction in bold, beside the completion."""
    run = RunOutput(output)
    listed = run.read(["id", "status"])  # the ids alone: a run of millions of rows fits
    if not listed.num_rows:
        return None
    finished = listed.filter(pc.equal(listed.column("status"), "ok")).column("id")
    first = pc.take(finished, pc.sort_indices(finished)[:count]).to_pylist()
    if not first:
        return None
    rows = sorted(run.rows_with_ids(first, ["prompt", "instruction", "completion", "steering"]), key=lambda r: r["id"])
    table = Table(title="examples", show_lines=True, expand=True)
    table.add_column("prompt (instruction in bold)", ratio=2)
    table.add_column(f"completion ({method})", ratio=3)
    for row in rows:
        prompt, instruction = row.get("prompt") or "", row.get("instruction") or ""
        text = Text(prompt)
        if instruction and instruction in prompt:
            start = prompt.index(instruction)
            text.stylize("bold yellow", start, start + len(instruction))
        steering = row.get("steering") or {}
        note = f"\n[{steering.get('steered', 0)}/{steering.get('steps', 0)} steps steered]" if steering else ""
        table.add_row(text, Text((row["completion"] or "").strip() + note))
    return table


def accuracy(summary: dict, output: str) -> Table:
    """IFEval accuracy per method, with the difference to the unsteered method and its interval."""
    from pipeline.report import METRIC_NAMES, METRICS, accuracy_cells

    table = Table(title=f"IFEval accuracy ({output}/report.html)")
    table.add_column("method")
    for metric in METRICS:
        table.add_column(METRIC_NAMES[metric])
    for row in accuracy_cells(summary, list(summary["accuracy"])):
        table.add_row(*row)
    return table


def ratios(values: dict[str, float]) -> Table:
    table = Table(title="ratios (targets in BENCHMARKS.md)")
    table.add_column("ratio")
    table.add_column("value", justify="right")
    for name, value in values.items():
        table.add_row(name, f"{value:.2f}")
    return table


def export_counts(report, output: str) -> Table:
    table = Table(title=f"directer export -> {output}")
    table.add_column("filter")
    table.add_column("rows", justify="right")
    for name, count in report.counts:
        table.add_row(name, str(count))
    return table


def memory_plan(plan: dict[str, Any]) -> Table:
    """``directer plan``: what one actor holds, per row and in all, and the batch sizes that fit."""
    mib = 1024**2
    heading = (
        f"{plan['model']} ({plan['dtype']}, {plan['device']}), {plan['method']}: "
        + (
            f"{plan['prompt_tokens']} prompt tokens (longest of {plan['prompts']} prompts)"
            if plan["prompts"]
            else f"{plan['prompt_tokens']} prompt tokens"
        )
        + f" + {plan['max_new_tokens']} new"
    )
    table = Table(show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("weights", f"{plan['weights'] / mib:,.1f} MiB")
    table.add_row("runtime", f"{plan['runtime'] / mib:,.1f} MiB")
    for name, size in plan["per_row"].items():
        table.add_row(f"per row: {name.replace('_', ' ')}", f"{size / mib:,.2f} MiB")
    largest = max(plan["pass_per_row"], key=plan["pass_per_row"].get)
    pass_bytes = plan["pass_per_row"][largest]
    table.add_row(f"per row: largest pass ({largest.replace('_', ' ')})", f"{pass_bytes / mib:,.2f} MiB")
    table.add_row("per row", f"{plan['row_bytes'] / mib:,.2f} MiB")
    for name, size in plan["workspace"].items():
        rows = f"batches of {plan['workspace_rows']}+ rows" if name == "decode" else "every batch"
        table.add_row(f"{rows}: weights repacked ({name})", f"{size / mib:,.1f} MiB")
    if plan["budget"] is not None:
        table.add_row("budget", f"{plan['budget'] / mib:,.1f} MiB")
        table.add_row("largest batch that fits", str(plan["max_batch"]))
        table.add_row("batch size when none is given", str(plan["chosen_batch"]))
    verdict = "fits" if plan["fits"] else "does NOT fit"
    table.add_row(f"batch of {plan['batch_size']}", f"{plan['batch_total'] / mib:,.1f} MiB ({verdict})")
    return Group(Text(heading), table)
