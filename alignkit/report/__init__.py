"""``alignkit report RUN_DIR... [--output report.html]``: one HTML page (PNGs beside it) about one or more runs.

Sections, each shown when its data exists (``collect`` finds the files the commands wrote):
1. evaluations: reward ± standard error, KL to the reference, distinct-2, length, cut-off share, per evaluate;
2. reward vs KL across runs, stages and checkpoints, best-of-N's curve from its own samples (the DPO paper's
   frontier plot), and reward beside distinct-2 and length (reward hacking: reward up, diversity down);
3. judge win rates against a baseline, raw and length-controlled (``winrate``);
4. sample completions side by side: the same held-out prompts, the base model and each method;
5. training curves per stage from metrics.jsonl (loss, reward, KL, accuracy, whatever was logged).
"""

from __future__ import annotations

import argparse
import html
import os
from dataclasses import dataclass
from pathlib import Path

from alignkit.config import arg
from alignkit.report.collect import Collected, Evaluation, collect
from alignkit.report.winrate import WinRate, win_rate


@dataclass
class ReportConfig:
    runs: str = arg("", "run directories (pipeline runs or single command outputs), comma-separated")
    output: str = arg("report.html", "the HTML page; its PNGs are written beside it")
    sample_prompts: int = arg(6, "prompts in the side-by-side samples table")
    title: str = arg("alignkit report", "page title")


STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1250px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;
font-size:13px}th{background:#f3f3f3}td.text{max-width:300px;white-space:pre-wrap}img{max-width:100%;
border:1px solid #eee;margin:4px 0}.note{color:#666;font-size:13px}"""


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cells) + "</tr>" for cells in rows)
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


def _cell(text: str, cls: str = "") -> str:
    return f'<td class="{cls}">{text}</td>' if cls else f"<td>{text}</td>"


def _img(path: Path | None, alt: str) -> str:
    return f'<p><img src="{html.escape(path.name)}" alt="{html.escape(alt)}"></p>' if path else ""


def _evaluation_table(evaluations: list[Evaluation]) -> str:
    rows = []
    for e in evaluations:
        m = e.metrics
        rows.append([_cell(html.escape(e.label)), _cell(html.escape(e.method)),
                     _cell(f"{e.reward:.3f} ± {e.reward_se:.3f}"), _cell(_fmt(e.kl)), _cell(_fmt(m.get("distinct-2"))),
                     _cell(_fmt(m.get("response/length"), 1)), _cell(_fmt(m.get("response/no_eos"), 2)),
                     _cell(_fmt(m.get("samples"))), _cell(html.escape(str(m.get("reward", ""))))])
    return _table(["evaluation", "method", "reward ± SE", "KL (nats/response)", "distinct-2", "length", "no EOS",
                   "samples", "reward source"], rows, "evaluations")


def _samples_table(evaluations: list[Evaluation], prompts: int) -> str:
    """First sample of each of the first ``prompts`` prompts shared by every evaluation, base model first."""
    shown = sorted((e for e in evaluations if e.samples), key=lambda e: e.method != "base")
    if not shown:
        return ""
    firsts = []
    for e in shown:
        first: dict[str, dict] = {}
        for s in e.samples:
            first.setdefault(s["prompt"], s)
        firsts.append(first)
    common = [p for p in firsts[0] if all(p in f for f in firsts[1:])][:prompts]
    rows = [[_cell(html.escape(p), "text")] + [_cell(f"{html.escape(f[p]['completion'])}<br><i>reward "
                                                     f"{f[p]['reward']:.3f}</i>", "text") for f in firsts]
            for p in common]
    return _table(["prompt"] + [f"{e.label} ({e.method})" for e in shown], rows, "samples")


def _win_table(rates: list[WinRate]) -> str:
    rows = [[_cell(html.escape(r.label)), _cell(str(r.n)), _cell(f"{r.raw:.3f} ± {r.raw_se:.3f}"),
             _cell(f"{r.length_controlled:.3f}"), _cell(f"{r.slope:+.3f}"), _cell(f"{r.mean_length_diff:+.1f}")]
            for r in rates]
    return _table(["comparison", "verdicts", "win rate ± SE", "length-controlled win rate", "length slope θ₁",
                   "mean length difference (words)"], rows, "win-rates")


def _bon_table(found: Collected) -> str:
    rows = [[_cell(html.escape(b.label)), _cell(str(k)), _cell(f"{reward:.3f}"), _cell(f"{kl:.3f}")]
            for b in found.best_of_n for k, reward, kl in b.curve()]
    return _table(["best-of-N samples", "N", "mean best reward", "KL = log N − (N−1)/N"], rows, "best-of-n")


def write_report(cfg: ReportConfig) -> Path:
    from alignkit.report import plots

    runs = [r for r in cfg.runs.split(",") if r]
    if not runs:
        raise ValueError("report: no run directories given")
    found = collect(runs)
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    figures = out.parent
    rates = [win_rate(v.label, v.records) for v in found.verdicts]
    parts = [f"<h1>{html.escape(cfg.title)}</h1>",
             f'<p class="note">runs: {", ".join(html.escape(str(Path(r).resolve())) for r in runs)}</p>']
    if found.evaluations:
        parts += ["<h2>Evaluations</h2>", _evaluation_table(found.evaluations),
                  '<p class="note">± is the standard error of the mean reward (sample std / √samples). KL is the '
                  "sequence-level estimate E<sub>π</sub>[log π(y) − log π<sub>ref</sub>(y)] from the samples.</p>"]
    frontier = plots.plot_frontier(found.evaluations, found.best_of_n, figures)
    if frontier:
        parts += ["<h2>Reward vs KL</h2>", _img(frontier, "reward vs KL")]
        if found.best_of_n:
            parts.append(_bon_table(found))
    behaviour = plots.plot_behaviour(found.evaluations, figures)
    if behaviour:
        parts += ["<h2>Reward beside diversity and length</h2>", _img(behaviour, "reward, distinct-2, length")]
    if rates:
        parts += ["<h2>Judge win rates</h2>", _win_table(rates), _img(plots.plot_win_rates(rates, figures), "win rates"),
                  '<p class="note">Length-controlled: σ(θ₀) of the logistic regression of the verdict on the '
                  "standardised length difference (AlpacaEval LC), the win rate predicted at equal lengths.</p>"]
    samples = _samples_table(found.evaluations, cfg.sample_prompts)
    if samples:
        parts += ["<h2>Samples side by side</h2>", samples]
    if found.curves:
        parts.append("<h2>Training curves</h2>")
        parts += [_img(plots.plot_curve(curve, figures), f"training curves {curve.label}") for curve in found.curves]
    if len(parts) == 2:
        raise ValueError(f"report: nothing to show in {', '.join(runs)} (no metrics.jsonl, evaluate JSON, bon.jsonl "
                         "or verdicts)")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(cfg.title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp.write_text(page)
    os.replace(tmp, out)
    return out


def run(cfg: ReportConfig) -> Path:
    path = write_report(cfg)
    print(f"report: {path}")
    return path


def add_report_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (pipeline runs or command outputs)")
    parser.add_argument("--output", default="report.html", help="the HTML page; its PNGs are written beside it")
    parser.add_argument("--sample-prompts", type=int, default=6, help="prompts in the side-by-side samples table")
    parser.add_argument("--title", default="alignkit report", help="page title")


def report_cli(args: argparse.Namespace) -> None:
    run(ReportConfig(runs=",".join(args.runs), output=args.output, sample_prompts=args.sample_prompts, title=args.title))


__all__ = ["ReportConfig", "add_report_flags", "report_cli", "run", "write_report"]
