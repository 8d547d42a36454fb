"""The report's first section, "How to read this report": the probes, the selection on val, the baselines, the
uncertainty, the verdict rule and the emergence step, with the run's own settings.
"""
from __future__ import annotations

from ..config import ReportConfig
from ..probe.stats import VERDICT_RULE
from . import emergence as emg


def rules_text(rc: ReportConfig, probe_cfg: dict | None) -> list[str]:
    pc = probe_cfg or {}
    bias = "with an unpenalised intercept" if pc.get("bias", True) else "without bias (the paper's probe)"
    target = "inverse depth (1/depth)" if pc.get("depth_target") == "inverse" else "depth"
    layout = pc.get("layout", "input") == "input"
    fair = ("- **Layout-fair probes**: every probe — U-Net, VAE encoder and decoder, the controls, the input x_t — "
            "reads the position-only prior (the train images' mean depth and salient log-odds at its native "
            "position, i.e. the position-only baseline) as two extra input channels with unpenalised weights. So "
            "every probe can reproduce the layout, and its score is what its features add *beyond layout*: features "
            "that carry position but no scene do not beat the position-only baseline, features that carry the scene "
            "but no position do. (Without the prior, a probe of features that carry no position — a permuted "
            "U-Net, the decoder's mid attention — could not even represent sky-on-top, and its failure measured "
            "that.) The probe without the prior (`<model>.noprior` in results.csv) is fitted beside it from the "
            f"same data in the protocols {', '.join(pc.get('plain_protocols', ['generate', 'sd']))} "
            "(`probe.plain_protocols`); there the paper table shows its verdicts too." if layout else
            "- **Probes without the layout prior** (`probe.layout: none`): features and intercept only; features "
            "that carry no position cannot represent the layout, so a low score can mean \"no position\" rather "
            "than \"no scene\".")
    return ["## How to read this report", "",
            f"- **Probes**: linear per position at each site's native resolution, {bias}; λ chosen on val from "
            f"{len(pc.get('lambdas', [])) or 'the'} values of `probe.lambdas`. Depth target: {target}, standardised "
            f"with the train split's mean and std.", fair,
            "- **Input control**: a probe on the U-Net's input x_t itself (each position with its 5×5 "
            "neighbourhood, plus the prior), per step. \"U-Net − input\" is what the network adds to what a local "
            "linear read of its input already gives.",
            "- **Selection on val, scores on test**: the best site (and step) of a group is chosen on the validation "
            "headline; its *test* value is reported. Headline metrics, fixed in advance: saliency **Dice**; depth "
            "**skill over the layout prior** = 1 − MSE(probe)/MSE(position-only probe at the same native "
            "resolution), on standardised depth. Spearman, Pearson, RMSE, AbsRel and δ<1.25 (all pixels and "
            "non-sky) are reported beside it, not used for verdicts.",
            "- **Baselines** are fitted on train and tuned on val like the probes: the position-only probe at each "
            "site's resolution (per-position mean depth / salient rate, threshold chosen on val), the mean map at "
            "label resolution (threshold chosen on val) and all-salient. The **strongest baseline** is the one "
            "best on val.",
            f"- **Uncertainty**: [lo, hi] is a {rc.ci_level:.0%} paired bootstrap CI over test images "
            f"({rc.n_boot} resamples, seed {rc.boot_seed}); differences resample the same images for both arms.",
            f"- **Verdict rule**: {VERDICT_RULE} Minimum effects: Dice {rc.min_dice:g}; depth skill "
            f"{rc.min_skill:g}; edits {rc.min_edit:g}. Against a baseline the depth effect is the skill over that "
            "baseline; between two probes it is the difference of their skills.",
            f"- **From step k**: the first step whose validation gain over the position-only baseline reaches "
            f"{rc.step_fraction:g} × the best step's gain, with the test gain at that step and its difference to the "
            "best step. Its uncertainty: k recomputed on every bootstrap resample of the test images (same "
            "resamples as the CIs) gives a distribution and a 95 % interval of k, shown for fractions "
            f"{', '.join(f'{x:g}' for x in emg.FRACTIONS)} too. \"Present by step s\" reads yes when that interval "
            "ends at or before s, no when it starts after s, else inconclusive.",
            "- **Per-step CIs are pointwise 95 %** (each step's own interval, not simultaneous over steps).",
            "- **Depth beside the headline** (not verdicts): *centred* skill (each image's mean depth removed from "
            "prediction and truth) and *scale-and-shift-invariant* skill (each image's prediction aligned by least "
            "squares, as relative depth is scored in the field), both over the position-only baseline.", ""]
