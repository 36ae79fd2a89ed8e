"""alignkit report: the page a real browser (headless Chromium) renders has its images loaded and its tables filled
from the files the commands wrote; the length-controlled win rate and the best-of-N curve have known answers."""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import write_jsonl
from test_pipeline import tiny_overrides

from alignkit.cli import main
from alignkit.pipeline import run_recipe
from alignkit.report.collect import BestOfN
from alignkit.report.winrate import length_controlled, win_rate

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run",
                           f"--user-data-dir={tmp / 'chromium-profile'}", "--allow-file-access-from-files", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory) -> Path:
    """The quickstart recipe on the tiny model (sample -> DPO -> evaluate x2 -> report), plus judge verdicts."""
    run = tmp_path_factory.mktemp("report") / "run"
    run_recipe("bundled:quickstart", tiny_overrides(tiny_model_dir), str(run), echo=False)
    base = [json.loads(x) for x in (run / "eval_base" / "eval.samples.jsonl").read_text().splitlines()]
    tuned = [json.loads(x) for x in (run / "eval_dpo" / "eval.samples.jsonl").read_text().splitlines()]
    # verdicts of a "judge" that prefers the higher reward, for the win-rate section
    write_jsonl(run / "eval_dpo" / "judge.verdicts.jsonl",
                [{"prompt": b["prompt"], "candidate": t["completion"], "baseline": b["completion"],
                  "win": 0.5 if t["reward"] == b["reward"] else float(t["reward"] > b["reward"])}
                 for b, t in zip(base, tuned)])
    return run


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make test installs it)")
def test_report_renders_in_headless_chromium(tiny_run, tmp_path):
    out = tmp_path / "page" / "report.html"
    assert main(["report", str(tiny_run), "--output", str(out)]) == 0
    page = out.read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert {"frontier.png", "behaviour.png", "win_rates.png", "curves_run_dpo.png"} <= set(images)
    assert all((out.parent / name).stat().st_size > 1000 for name in images)

    # the page as Chromium loads it, plus a probe that records, after load, which images decoded
    probe = out.with_name("probe.html")
    probe.write_text(page.replace("</body>", "<script>window.addEventListener('load', () => { document.body.dataset"
                                  ".loaded = [...document.images].filter(i => i.complete && i.naturalWidth > 0).length; "
                                  "document.body.dataset.total = document.images.length; });</script></body>"))
    dom = _chromium("--virtual-time-budget=5000", "--dump-dom", probe.as_uri(), tmp=tmp_path).stdout
    total, loaded = (int(re.search(rf'data-{k}="(\d+)"', dom).group(1)) for k in ("total", "loaded"))
    assert total == len(images) and loaded == total
    for table in ("evaluations", "samples", "win-rates", "best-of-n"):
        assert f'<table class="{table}">' in dom
    # the samples table: one row per shared prompt (6), the base model's column first
    samples = dom.split('<table class="samples">')[1].split("</table>")[0]
    assert samples.count("<tr>") == 1 + 6 and samples.index("(base)") < samples.index("(dpo)")
    evaluations = dom.split('<table class="evaluations">')[1].split("</table>")[0]
    reward = json.loads((tiny_run / "eval_dpo" / "eval.json").read_text())["reward/mean"]
    assert f"{reward:.3f} ± " in evaluations

    shot = tmp_path / "shot.png"
    _chromium("--screenshot=" + str(shot), "--window-size=1280,2000", out.as_uri(), tmp=tmp_path)
    from PIL import Image

    pixels = Image.open(shot).convert("L")
    low, high = pixels.getextrema()
    assert pixels.size == (1280, 2000) and high - low > 100  # not a blank page


def test_pipeline_report_stage_wrote_the_page(tiny_run):
    page = (tiny_run / "report" / "report.html").read_text()
    assert "Reward vs KL" in page and "Samples side by side" in page and "Training curves" in page


def test_length_controlled_win_rate_known_answer():
    """Verdicts drawn exactly from P(win | d) = σ(θ₀ + θ₁·d/sd(d)) with θ₀ = 0, θ₁ = 2: the candidate is usually
    longer, so its raw win rate is well above 1/2, but at equal length it wins half the time: LC = σ(0) = 0.5."""
    rng = random.Random(0)
    diffs = [rng.gauss(3.0, 4.0) for _ in range(400)]
    sd = (sum((d - sum(diffs) / 400) ** 2 for d in diffs) / 400) ** 0.5
    wins = [1 / (1 + math.exp(-2.0 * d / sd)) for d in diffs]
    lc, slope = length_controlled(wins, diffs)
    assert lc == pytest.approx(0.5, abs=1e-4) and slope == pytest.approx(2.0, abs=1e-3)
    rate = win_rate("x", [{"win": w, "length_diff": d} for w, d in zip(wins, diffs)])
    assert rate.raw > 0.7 and rate.length_controlled == pytest.approx(0.5, abs=1e-4)
    # θ₀ = 1: LC = σ(1)
    wins = [1 / (1 + math.exp(-(1.0 + 2.0 * d / sd))) for d in diffs]
    assert length_controlled(wins, diffs)[0] == pytest.approx(1 / (1 + math.exp(-1.0)), abs=1e-4)


def test_win_rate_lengths_from_texts_and_one_sided_verdicts():
    records = [{"win": 1.0, "candidate": "a b c", "baseline": "a"}, {"win": 1.0, "candidate": "a", "baseline": "a b"}]
    rate = win_rate("x", records)
    assert rate.mean_length_diff == pytest.approx(0.5) and rate.raw == 1.0 and rate.length_controlled == 1.0


def test_best_of_n_curve_by_hand():
    """Two prompts, N = 4: best of the first k samples, averaged; KL = log k − (k−1)/k."""
    bon = BestOfN("b", [[0.1, 0.5, 0.2, 0.9], [0.3, 0.0, 0.4, 0.1]])
    curve = bon.curve()
    assert [k for k, _, _ in curve] == [1, 2, 4]
    assert [r for _, r, _ in curve] == pytest.approx([0.2, 0.4, 0.65])
    assert [kl for _, _, kl in curve] == pytest.approx([0.0, math.log(2) - 0.5, math.log(4) - 0.75])


def test_report_errors_are_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 1
    assert capsys.readouterr().err.strip() == f"alignkit: error: report: {tmp_path / 'missing'} is not a directory"
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--output", str(tmp_path / "r.html")]) == 1
    assert "nothing to show" in capsys.readouterr().err and not (tmp_path / "r.html").exists()
