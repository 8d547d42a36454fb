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

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    r = synthetic_run(tmp_path_factory.mktemp("report"), n=40, channels=8, size=16, steps=3,
                      sites={"unet.down0.attn0": 8, "unet.mid.attn0": 4, "vae.dec.mid.attn0": 8},
                      models=("ldm", "permuted"), noise=0.3)
    run_probes(r, ProbeConfig(), progress=False)
    _fake_readout_and_interventions(r)
    (r / "report" / "extra").mkdir(parents=True, exist_ok=True)
    (r / "report" / "extra" / "10-labeller.md").write_text("# Labeller quality\n\nDice of the labeller: **0.9**.\n")
    return r


def _fake_readout_and_interventions(r):
    """What the read-out and intervention stages write (their formats), with made-up values."""
    import json

    import numpy as np
    from safetensors import safe_open
    with safe_open(str(r / "report" / "per_image.safetensors"), framework="np") as f:
        rows = f.get_tensor("noised/test-rows")
    rng = np.random.default_rng(0)
    lines = ["protocol,step,timestep,row,sample_id,task,metric,value"]
    for step, t in enumerate((999, 500, 0)):
        for row in rows:
            lines.append(f"noised,{step},{t},{row},{row},saliency,dice,{rng.uniform(0, 0.3 * step + 0.1):.6g}")
            lines.append(f"noised,{step},{t},{row},{row},depth,mse,{rng.uniform(0.2, 1.0):.6g}")
    (r / "readout").mkdir(exist_ok=True)
    (r / "readout" / "noised.csv").write_text("\n".join(lines) + "\n")
    est = lambda m, lo, hi: {"mean": m, "lo": lo, "hi": hi, "n": 16}          # noqa: E731
    block = {"metric": "depth gain", "gain": {"probe": est(0.004, 0.003, 0.005), "random": est(0.001, 0.0, 0.002)},
             "probe_minus": {"random": est(0.003, 0.002, 0.004)}, "strongest_control": "random", "answer": "no"}
    (r / "interventions").mkdir(exist_ok=True)
    (r / "interventions" / "results.json").write_text(json.dumps({"protocol": "noised",
                                                                  "kinds": {"attn": {"depth": block}}}))


def test_report_is_self_contained_and_answers_with_numbers(run, capsys):
    assert main(["report", "--run", str(run), "--adopt"]) == 0        # synthetic_run writes no marker: claimed
    html_path = run / "report" / "report.html"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(html_path)
    page = html_path.read_text()
    assert page.count("data:image/png;base64,") == 5            # 2 curves, 2 heatmaps, 1 prediction grid
    assert not re.search(r'src="(?!data:)', page)               # nothing to fetch
    for name in ("curves_noised_depth", "curves_noised_saliency", "heatmap_noised_depth", "heatmap_noised_saliency",
                 "predictions_noised"):
        assert (run / "report" / "figures" / f"{name}.png").stat().st_size > 1000
    md = (run / "report" / "summary.md").read_text()
    for question in ("How to read this report", "Verdict rule", "Does the U-Net linearly encode depth and saliency?",
                     "From which step?", "The VAE: encoder and decoder, separately",
                     "How far above the controls and the strongest baseline?", "Compared with the paper",
                     "Labels: exact"):
        assert question in md and question in page
    num = r"-?\d+\.\d+ \[-?\d+\.\d+, -?\d+\.\d+\]"
    assert re.search(rf"\*\*saliency: (yes|no|inconclusive)\.\*\* Best U-Net probe `unet\.\w+\.attn0` at step \d.*"
                     rf"test Dice \*\*{num}\*\*.*probe − baseline \*\*{num}\*\* Dice", md)
    assert re.search(rf"\*\*depth: (yes|no|inconclusive)\.\*\* .*skill over the layout prior \*\*{num}\*\*", md)
    assert "Labeller quality" in md and "<h3>Labeller quality</h3>" in page and "<b>0.9</b>" in page
    assert "Probe vs image read-out" in md and "the probe is ahead of the image read-out" in md
    assert re.search(r"\| editing activations through the probe changes depth \(edits of the attention output\) \| "
                     r"depth gain 0\.004 \[0\.003, 0\.005\]; probe − strongest control \(random\) 0\.003 .*\| no \|", md)


def test_summary_quotes_only_numbers_from_results_csv(run):
    """Every decimal number in the summary's own part (before "Further analyses", whose sections belong to other
    stages) is a value, lo or hi of some results.csv row, to the three decimals printed — or one of the report's
    fixed constants (minimum effects and step fraction from the config, the paper's reference values, δ<1.25)."""
    from sceneprobe.config import ReportConfig
    from sceneprobe.report.paper_table import PAPER
    write_report(run)
    md = (run / "report" / "summary.md").read_text().split("\n## Further analyses")[0]
    rows = read_results(run / "report" / "results.csv")
    table = {f"{v:.3f}" for r in rows for v in (r["value"], r["lo"], r["hi"]) if v == v}
    table |= {f"{-0.0:.3f}"}
    rc = ReportConfig()
    from sceneprobe.report.emergence import FRACTIONS
    constants = {f"{x:g}" for x in (rc.min_dice, rc.min_skill, rc.min_edit, rc.step_fraction, *PAPER.values(),
                                    1.25, *FRACTIONS)}                          # 1.25: in the metric name δ<1.25
    quoted = re.findall(r"(?<![\w.])-?\d+\.\d+", md)
    assert len(quoted) > 50
    missing = [q for q in quoted if q not in table and q not in constants]
    assert not missing, missing[:10]


def test_cis_and_comparisons_are_in_results_csv_and_rewrites_are_stable(run):
    write_report(run)
    first = (run / "report" / "results.csv").read_bytes()
    rows = read_results(run / "report" / "results.csv")
    best = [r for r in rows if r["model"] == "ldm" and r["split"] == "test" and r["metric"] == "dice" and r["lo"] == r["lo"]]
    assert best and all(r["lo"] <= r["value"] <= r["hi"] for r in best)
    comps = [r for r in rows if "-vs-" in r["metric"]]
    assert any(r["metric"].startswith("dice-vs-baseline:") for r in comps)
    assert any(r["metric"].startswith("skill-vs-permuted:") for r in comps)
    write_report(run)
    assert (run / "report" / "results.csv").read_bytes() == first             # the report's rows are replaced


def test_verdicts_follow_the_rule_on_planted_data(run):
    """Planted signal in the U-Net, none in the permuted control: the U-Net beats the strongest baseline (yes),
    the control does not (no), and the U-Net − control difference is yes."""
    from sceneprobe.config import ReportConfig
    from sceneprobe.probe.sweep import read_per_image, read_positions
    from sceneprobe.report.analysis import analyse
    pi = run / "report" / "per_image.safetensors"
    _, an, f = analyse(read_results(run / "report" / "results.csv"), read_per_image(pi), read_positions(pi),
                       ReportConfig())
    f = f["noised"]
    assert f["encodes"]["saliency"].verdict == "yes" and f["encodes"]["depth"].verdict == "yes"
    assert f["groups"][("permuted", "unet")]["saliency"]["vs_strongest"].verdict == "no"
    assert f["controls"]["saliency"][("permuted", "unet")].verdict == "yes"
    strict = analyse(read_results(run / "report" / "results.csv"), read_per_image(pi), read_positions(pi),
                     ReportConfig(min_dice=0.99, min_skill=0.99))[2]["noised"]
    assert strict["encodes"]["saliency"].verdict != "yes"                     # an effect below the minimum


def test_best_site_is_chosen_on_val_and_emergence(run):
    from sceneprobe.report.analysis import emergence_step, val_gain
    from sceneprobe.report.results_index import Results
    res = Results(read_results(run / "report" / "results.csv"))
    curve = res.curve("noised", "ldm", "unet", "saliency")
    assert [p.step for p in curve] == [0, 1, 2]
    for p in curve:
        vals = [res.get("noised", "ldm", s, p.step, "saliency", "val") for s in res.sites("noised", "ldm", "unet")]
        assert p.val == max(vals)
    gains = [(p, val_gain(res, "noised", p, "saliency", "mean-map")) for p in curve]
    k, best = emergence_step(gains, 0.9)
    top = max(g for _, g in gains)
    assert dict((p.step, g) for p, g in gains)[k.step] >= 0.9 * top
    assert all(g < 0.9 * top for p, g in gains if p.step < k.step)
    assert emergence_step([(p, -1.0) for p in curve], 0.9) is None           # no gain: no emergence step


def test_intervention_claims_are_quoted_with_their_verdicts():
    from sceneprobe.report.intervention_claims import intervention_claims
    est = lambda m, lo, hi: {"mean": m, "lo": lo, "hi": hi, "n": 16}          # noqa: E731
    block = {"metric": "moved-mask gain", "gain": {"probe": est(0.02, -0.01, 0.05), "random": est(0.0, -0.02, 0.02)},
             "probe_minus": {"random": est(0.02, -0.01, 0.04)}, "strongest_control": "random", "answer": "no"}
    claims, ests = intervention_claims({"protocol": "generate", "claims": {"saliency": {"answer": "no"}},
                                        "kinds": {"attn": {"saliency": block}}})   # interventions/results.json
    assert claims == [{"protocol": "generate", "claim": "moves the object", "where": "edits of the attention output", "task": "saliency",
                       "answer": "no",
                       "text": "moved-mask gain 0.020 [-0.010, 0.050]; probe − strongest control (random) "
                               "0.020 [-0.010, 0.040]"}]
    assert [e.metric for e in ests] == ["gain", "gain-vs-random"]
    assert intervention_claims(None) == ([], [])


def test_markdown_subset():
    out = markdown_to_html("# T\n\npara **b** `c` <x>\n\n- one\n- two\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    assert "<h1>T</h1>" in out and "<b>b</b>" in out and "<code>c</code>" in out and "&lt;x&gt;" in out
    assert "<ul><li>one</li><li>two</li></ul>" in out and "<td>1</td><td>2</td>" in out


def test_report_without_results_is_an_error(tmp_path):
    with pytest.raises(SceneprobeError, match="results file"):
        write_report(tmp_path)
