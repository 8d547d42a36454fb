"""The report: figures, a self-contained HTML, a summary that answers with numbers, the extension hook."""
from __future__ import annotations

import re

import pytest
import torch

from sceneprobe.cli import main
from sceneprobe.config import ProbeConfig
from sceneprobe.errors import SceneprobeError
from sceneprobe.probe.sweep import read_results, run_probes
from sceneprobe.probe.synthetic import synthetic_run
from sceneprobe.report import write_report
from sceneprobe.report.html import markdown_to_html
from sceneprobe.report.summary import Results, emergence

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    r = synthetic_run(tmp_path_factory.mktemp("report"), n=40, channels=8, size=16, steps=3,
                      sites={"unet.down0.attn0": 8, "unet.mid.attn0": 4, "vae.dec.mid.attn0": 8},
                      models=("ldm", "permuted"), noise=0.3)
    run_probes(r, ProbeConfig(), progress=False)
    (r / "report" / "extra").mkdir(parents=True, exist_ok=True)
    (r / "report" / "extra" / "10-labeller.md").write_text("# Labeller quality\n\nDice of the labeller: **0.9**.\n")
    return r


def test_report_is_self_contained_and_answers_with_numbers(run, capsys):
    assert main(["report", "--run", str(run)]) == 0
    html_path = run / "report" / "report.html"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(html_path)
    page = html_path.read_text()
    assert page.count("data:image/png;base64,") == 5            # 2 curves, 2 heatmaps, 1 prediction grid
    assert not re.search(r'src="(?!data:)', page)               # nothing to fetch
    for name in ("curves_noised_depth", "curves_noised_saliency", "heatmap_noised_depth", "heatmap_noised_saliency",
                 "predictions_noised"):
        assert (run / "report" / "figures" / f"{name}.png").stat().st_size > 1000
    md = (run / "report" / "summary.md").read_text()
    for question in ("Does the U-Net linearly encode depth and saliency?", "From which step?",
                     "Does the VAE's self-attention encode them?", "How far above controls and baselines?",
                     "Compared with the paper"):
        assert question in md and question in page
    assert re.search(r"\*\*depth: (yes|weakly|no)\.\*\* Best U-Net probe `unet\.\w+\.attn0` at step \d", md)
    m = re.search(r"\*\*depth by RMSE: (yes|weakly|no)\.\*\* U-Net probe RMSE ([\d.]+) vs the best reference .*? ([\d.]+): "
                  r"(\d+) % (lower|higher)", md)
    assert m, "depth is also judged by RMSE against the baseline and controls"
    gain = 1 - float(m.group(2)) / float(m.group(3))
    assert m.group(5) == ("lower" if gain >= 0 else "higher") and abs(abs(100 * gain) - int(m.group(4))) <= 1
    assert "Labeller quality" in md and "<h3>Labeller quality</h3>" in page and "<b>0.9</b>" in page


def test_extra_sections_hook(run):
    page = write_report(run, extra_sections=[("Interventions", "Moved objects: 12 of 16."),
                                             ("Raw", "<p id='raw'>html body</p>")]).read_text()
    assert "<h3>Interventions</h3>" in page and "Moved objects: 12 of 16." in page and "<p id='raw'>" in page
    assert page.index("Interventions") < page.index("Labeller quality")  # arguments first, then extra/*.md


def test_best_site_is_chosen_on_val_and_emergence(run):
    res = Results(read_results(run / "report" / "results.csv"))
    curve = res.curve("noised", "ldm", "unet", "saliency")
    assert [p.step for p in curve] == [0, 1, 2]
    for p in curve:
        vals = [res.get("noised", "ldm", s, p.step, "saliency", "val") for s in res.sites("noised", "ldm", "unet")]
        assert p.val == max(vals)
    e = emergence(curve)
    assert e.test >= 0.9 * max(p.test for p in curve)
    assert all(p.test < 0.9 * max(q.test for q in curve) for p in curve if p.step < e.step)


def test_markdown_subset():
    out = markdown_to_html("# T\n\npara **b** `c` <x>\n\n- one\n- two\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    assert "<h1>T</h1>" in out and "<b>b</b>" in out and "<code>c</code>" in out and "&lt;x&gt;" in out
    assert "<ul><li>one</li><li>two</li></ul>" in out and "<td>1</td><td>2</td>" in out


def test_report_without_results_is_an_error(tmp_path):
    with pytest.raises(SceneprobeError, match="results file"):
        write_report(tmp_path)
