"""Figures and the Markdown report of :func:`robustcaps.diagnostics.run_diagnostics`.

``write_figures(result, out)`` draws (Agg backend, seaborn):

- ``grad_log10_hist.png``: overlaid histograms of log10|g| per model;
- ``grad_norms.png``: per-sample L1 / L2 / Linf gradient norms per model;
- ``loss_profile.png``: loss and accuracy along the gradient-sign direction and a random
  sign direction;
- ``attack_curves.png``: success rate vs epsilon for FGSM, PGD, random noise and transfer.

``write_report(result, out, figures)`` writes ``gradient_report.md``, which embeds them by
relative path.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .adaptive import CAPSULE_ATTACKS, available
from .indicators import CHECKS, DEVIATIONS, FAIL, NA, PASS, WARN

if TYPE_CHECKING:
    from . import DiagnosticsResult

# What a flag means, in plain words (used in the per-model conclusions).
MEANING = {
    "G1": "many input-gradient entries are exactly zero, so sign-gradient attacks leave those "
          "pixels untouched",
    "G2": "the gradient contains NaN/Inf values, so gradient attacks are computing garbage",
    "G3": "float32 gradients differ from the same model's float64 gradients: the gradient is "
          "dominated by rounding (numerical instability)",
    "G4": "the autograd gradient does not predict how the loss actually changes (finite "
          "differences disagree): the loss is flat, stepped or noisy at small scales",
    "G5": "its gradients are many orders of magnitude smaller than the other models', the "
          "signature Brendel & Bethge (2017) found for a saturated, masked model",
    "A": "single-step FGSM beats iterative PGD, which an honest loss landscape does not allow",
    "B": "examples crafted on another model fool it more often than white-box attacks on "
         "itself: its own gradients point the attack the wrong way",
    "C": "accuracy does not fall to zero even with an unbounded perturbation: the attack, "
         "not the model, is failing",
    "D": "random sign noise of the same size works about as well as the gradient attack: the "
         "gradient carries little information",
    "P1": "for some samples the gradient is entirely zero, or autograd cannot reach the "
          "input at all (an interrupted graph), so gradient attacks cannot move; replace the "
          "non-differentiable step by a differentiable approximation in the backward pass "
          "(BPDA, Athalye et al. 2018)",
    "P2": "the attack loss changes a lot under tiny random noise: the model is randomised or "
          "numerically unstable, so a single gradient is unreliable (average gradients over "
          "the randomness: EOT)",
    "P3": "PGD passed through adversarial points but the point it returned is not adversarial "
          "when the model is asked again: the model answers differently each time",
    "P4": "the attack loss was still rising in the last steps on samples it failed on: more "
          "iterations would likely find more adversarial examples",
    "P5": "the label the attack recorded for its example differs from the model's own fresh "
          "prediction of the same input: success counts from this model are not repeatable",
    "P6": "an unbounded attack does not fool every sample, which no honest classifier can "
          "resist: the attack is broken for this model",
}

BADGE = {PASS: "PASS", WARN: "**WARN**", FAIL: "**FAIL**", NA: "n/a"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    return plt, sns


def write_figures(result: DiagnosticsResult, out: Path) -> dict[str, Path]:
    """Draw the four figures into ``out``; returns {kind: path}."""
    plt, sns = _plt()
    import matplotlib
    import matplotlib.ticker  # noqa: F401 - used as matplotlib.ticker below

    from ..report.plots import save_figure
    models = [m["name"] for m in result.config["models"]]
    palette = dict(zip(models, sns.color_palette("colorblind", len(models)), strict=True))
    paths: dict[str, Path] = {}

    # 1. log10 |g| histograms
    fig, ax = plt.subplots(figsize=(8, 4.5))
    zf = result.stats.set_index("model")["zero_fraction"]
    drawn = False
    allv = np.concatenate([v[np.isfinite(v)] for v in result.log10_abs.values()] or [np.zeros(0)])
    bins = np.linspace(allv.min(), allv.max() + 1e-9, 100) if allv.size else 10
    for m in models:
        v = result.log10_abs.get(m, np.zeros(0))
        v = v[np.isfinite(v)]
        label = f"{m} (exact zeros: {100 * zf[m]:.1f}%)"
        if v.size:
            ax.hist(v, bins=bins, density=True, histtype="stepfilled", alpha=0.35,
                    color=palette[m], label=label)
            ax.hist(v, bins=bins, density=True, histtype="step", color=palette[m])
            drawn = True
        else:
            ax.plot([], [], color=palette[m], label=f"{m}: every entry is exactly 0")
    ax.set_xlabel("log10 |dL/dx| per input entry (zeros excluded)")
    ax.set_ylabel("density")
    ax.set_title("Input-gradient magnitudes of the attack loss")
    ax.legend(loc="upper left", fontsize=9)
    if not drawn:
        ax.text(0.5, 0.5, "no non-zero gradient entry", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    paths["fig_hist"] = out / "grad_log10_hist.png"
    save_figure(fig, paths["fig_hist"], dpi=120)
    plt.close(fig)

    # 2. per-sample norms
    ps = result.per_sample
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2), sharey=True)
    for ax, col, title in zip(axes, ("l1", "l2", "linf"), ("L1", "L2", "L-inf"), strict=True):
        data, labels, colors = [], [], []
        for m in models:
            v = ps.loc[ps["model"] == m, col].to_numpy()
            v = v[v > 0]
            data.append(np.log10(v) if v.size else np.array([np.nan]))
            labels.append(m)
            colors.append(palette[m])
        for i, (d, c) in enumerate(zip(data, colors, strict=True)):
            d = d[np.isfinite(d)]
            if d.size:
                parts = ax.violinplot([d], positions=[i], showmedians=True,
                                       orientation="horizontal")
                for b in parts["bodies"]:
                    b.set_facecolor(c)
                    b.set_alpha(0.5)
            else:
                ax.text(0, i, "  all zero", va="center", fontsize=9)
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels)
        ax.set_xlabel(f"log10 {title} norm of dL/dx per sample")
        ax.set_title(f"{title} norm")
    fig.suptitle("Per-sample gradient norms (zero-norm samples omitted)")
    fig.tight_layout()
    paths["fig_norms"] = out / "grad_norms.png"
    save_figure(fig, paths["fig_norms"], dpi=120)
    plt.close(fig)

    # 3. loss along the gradient direction
    pr = result.profiles
    if len(pr):
        fig, axes = plt.subplots(2, len(models), figsize=(4.2 * len(models) + 1, 6.5),
                                 squeeze=False, sharex=True)
        styles = {"gradient": "-", "random": "--"}
        for j, m in enumerate(models):
            d = pr[pr["model"] == m]
            for direction, ls in styles.items():
                g = d[d["direction"] == direction].groupby("t")
                med = g["loss"].median()
                q1, q3 = g["loss"].quantile(0.25), g["loss"].quantile(0.75)
                axes[0, j].plot(med.index, med.values, ls, color=palette[m],
                                label="sign(grad)" if direction == "gradient" else "random sign")
                axes[0, j].fill_between(med.index, q1.values, q3.values, color=palette[m], alpha=0.15)
                acc = g["correct"].mean()
                axes[1, j].plot(acc.index, 100 * acc.values, ls, color=palette[m],
                                label="sign(grad)" if direction == "gradient" else "random sign")
            axes[0, j].set_title(m)
            axes[0, j].set_ylabel("attack loss (median, IQR)")
            axes[1, j].set_ylabel("accuracy (%)")
            axes[1, j].set_ylim(-3, 103)
            axes[1, j].set_xlabel("step size t (L-inf, input units)")
            axes[0, j].legend(fontsize=8)
        fig.suptitle(f"Loss along x + t * direction ({pr['sample'].nunique()} samples)")
        fig.tight_layout()
        paths["fig_profile"] = out / "loss_profile.png"
        save_figure(fig, paths["fig_profile"], dpi=120)
        plt.close(fig)

    # 4. attack curves
    cu = result.curves
    cu = cu[cu["attack"] != "pgd-unbounded"] if len(cu) else cu
    if len(cu):
        fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models) + 1, 4.2),
                                 squeeze=False, sharey=True)
        for j, m in enumerate(models):
            ax = axes[0, j]
            d = cu[cu["model"] == m]
            for attack, g in d.groupby("attack", sort=False):
                style = {"fgsm": "o--", "pgd": "s-", "random": "x:"}.get(attack, "d-.")
                ax.plot(g["epsilon"], 100 * g["success_rate"], style, label=attack,
                        markerfacecolor="none" if attack == "fgsm" else None,
                        markersize=9 if attack == "fgsm" else 6)
            ax.set_xscale("log")
            ticks = sorted(d["epsilon"].unique())
            ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.xaxis.set_major_formatter(matplotlib.ticker.FixedFormatter([f"{t:g}" for t in ticks]))
            ax.set_title(m)
            ax.set_xlabel("epsilon (L-inf, input units)")
            ax.set_ylim(-3, 103)
            ax.legend(fontsize=8)
        axes[0, 0].set_ylabel("success rate on clean-correct samples (%)")
        fig.suptitle("Attack success vs epsilon")
        fig.tight_layout()
        paths["fig_curves"] = out / "attack_curves.png"
        save_figure(fig, paths["fig_curves"], dpi=120)
        plt.close(fig)
    return paths


# ---------------------------------------------------------------------------- markdown
def _fmt(v: float, kind: str = "g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if kind == "pct":
        return f"{100 * v:.2f}%"
    if kind == "e":
        return f"{v:.2e}"
    return f"{v:.3g}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def conclusion(result: DiagnosticsResult, model: str) -> str:
    """A plain-language paragraph on one model's verdicts."""
    v = result.verdicts[result.verdicts["model"] == model]
    fails = v[v["verdict"] == FAIL]
    warns = v[v["verdict"] == WARN]
    passed = v[v["verdict"] == PASS]
    st = result.stats.set_index("model").loc[model]
    parts = []
    if fails.empty and warns.empty:
        parts.append(f"No indicator of gradient masking: all {len(passed)} applicable checks pass. "
                     "Gradient attacks get usable, finite, numerically stable gradients that agree "
                     "with finite differences, so robustness numbers measured with them can be "
                     "taken at face value (as lower bounds on what a stronger attack could do).")
    elif fails.empty:
        parts.append("No check fails, but some warn; the robustness numbers are usable with the "
                     "caveats below.")
    elif set(fails["id"]) <= {"P3", "P4"}:
        parts.append("**The gradients look usable, but the attack as configured is not finished "
                     "with this model:** rerun with more PGD steps (`--steps`) before trusting "
                     "its robustness numbers.")
    else:
        parts.append("**Robustness numbers for this model should not be trusted as they stand.**")
    for _, r in pd.concat([fails, warns]).iterrows():
        parts.append(f"{r['verdict']} {r['id']} ({r['check']}): {MEANING.get(r['id'], '')} "
                     f"[{r['numbers']}].")
    mag = result.magnitudes
    mine = mag[mag["model"] == model] if len(mag) else mag
    for _, r in mine.iterrows():
        ratio = r["log10_l1_ratio"]
        if isinstance(ratio, float) and math.isfinite(ratio):
            word = "smaller" if ratio < 0 else "larger"
            parts.append(f"Its median L1 gradient norm is {abs(ratio):.1f} orders of magnitude {word} "
                         f"than {r['reference']}'s.")
        elif isinstance(ratio, float) and ratio == -math.inf:
            parts.append(f"Its gradients are zero where {r['reference']}'s are not.")
    if model in result.recommended:
        parts.append(next_attacks(result, model))
    parts.append(f"Clean accuracy on these samples: {_fmt(st['clean_accuracy'], 'pct')}.")
    return " ".join(parts)


def next_attacks(result: DiagnosticsResult, model: str) -> str:
    """The capsule-aware attacks to run next, and whether this installation has them."""
    names = [f"`{n}` ({CAPSULE_ATTACKS[n]}{'' if available(n) else '; not in this installation'})"
             for n in result.recommended[model]]
    ran = " (run below)" if len(result.adaptive) else ""
    return ("**Next:** this is a capsule network and the checks point at the attack, so run "
            f"the capsule-aware attacks{ran}: " + "; ".join(names) + ". "
            "`robustcaps diagnose --adaptive` runs those available.")


def adaptive_section(result: DiagnosticsResult) -> list[str]:
    """Markdown lines: success rates of the capsule-aware attacks, or why they did not run."""
    L = ["## Capsule-aware attacks", ""]
    ad = result.adaptive
    for (model, attack), g in ad.groupby(["model", "attack"], sort=False):
        status = g["status"].iloc[0]
        if status != "ran":
            L.append(f"- {model}, `{attack}`: {status}.")
            continue
        rates = ", ".join(f"eps {e:g}: {_fmt(r, 'pct')}" for e, r in zip(g["epsilon"], g["success_rate"], strict=True))
        L.append(f"- {model}, `{attack}`: success on clean-correct samples {rates}.")
    L.append("")
    return L


def write_report(result: DiagnosticsResult, out: Path, figures: dict[str, Path]) -> Path:
    """Write ``gradient_report.md`` into ``out`` and return its path."""
    cfg = result.config
    models = [m["name"] for m in cfg["models"]]
    st = result.stats.set_index("model")
    L: list[str] = []
    L.append("# Gradient-masking diagnostics")
    L.append("")
    L.append(
        "A model can look robust because gradient-based attacks *fail on it*, not because "
        "adversarial examples do not exist: gradients that are zero, vanishing, numerically "
        "unstable, noisy or misleading (\"gradient masking\", Papernot et al. 2017; Athalye et "
        "al. 2018). Section 6 of *Matrix capsules with EM routing* (Hinton et al., ICLR 2018) "
        "rules out numerical masking with two measurements: the share of exactly-zero values in "
        "the gradient of the loss w.r.t. the image, and the gradient magnitude (capsule "
        "gradients about 2 orders of magnitude smaller than the CNN's, against the 16 orders "
        "Brendel & Bethge (2017) found for a masked model). This report repeats those "
        "measurements and adds the stronger checks the literature has since introduced, "
        "including the six Indicators of Attack Failure of Pintor et al. (NeurIPS 2022). Each "
        "check has a stated formula and threshold and ends in PASS, WARN or FAIL."
    )
    L.append("")
    L.append("## Setup")
    L.append("")
    rows = []
    for m in cfg["models"]:
        rows.append([m["name"], m["module"], m.get("weights", "user"), f"{m['params']:,}",
                     m["outputs"], m["loss"], m["dtype"],
                     _fmt(st.loc[m["name"], "clean_accuracy"], "pct")])
    L.append(_table(["model", "module", "weights", "parameters", "outputs", "attack loss",
                     "dtype", "clean accuracy"], rows))
    L.append("")
    untrained = [m["name"] for m in cfg["models"] if m.get("weights") == "untrained"]
    if untrained:
        L.append(f"**Note:** {', '.join(untrained)} {'is an' if len(untrained) == 1 else 'are'} "
                 "untrained architecture{} (randomly initialised weights, no zoo checkpoint): "
                 "the verdicts describe that network, not a trained model.".format(
                     "" if len(untrained) == 1 else "s"))
        L.append("")
    L.append(f"- Data: {cfg.get('dataset') or 'user-supplied tensors'}; N = {cfg['n_samples']} "
             f"samples of shape {tuple(cfg['input_shape'])}; data scale (box width or std) "
             f"{cfg['data_scale']:.3g}.")
    L.append("- Gradients are of each model's own attack loss (`ce` = softmax cross-entropy on "
             "the scores; for capsule networks the scores are the logits of the class "
             "activations) w.r.t. the input, exactly what FGSM/PGD use.")
    if cfg["attacks"]:
        L.append(f"- Attack indicators: epsilons {', '.join(f'{e:g}' for e in cfg['epsilons'])} "
                 f"(L-inf, input units); native PGD with K = {cfg['steps']} steps of eps/3, no "
                 f"random start, tracked per iteration; unbounded PGD eps_inf = "
                 f"{cfg['unbounded_eps']:g}, K steps of eps_ref/3; {cfg['gamma']} noise draws "
                 f"of radius {cfg['unstable_radius']:.3g} per sample (P2); "
                 f"{cfg['n_random']} random sign draws per sample and epsilon; success rates are "
                 "over the samples each model classifies correctly.")
    L.append(f"- Total time {cfg.get('seconds_total', float('nan')):.1f} s; seed {cfg['seed']}; "
             f"torch {cfg['torch']}.")
    L.append("")
    L.append("## Verdicts")
    L.append("")
    vt = result.verdict_table()
    rows = [[i, vt.loc[i, "check"]] + [BADGE[vt.loc[i, m]] for m in models] for i in vt.index]
    overall = result.overall()
    rows.append(["", "**overall (worst)**"] + [BADGE[overall[m]] for m in models])
    L.append(_table(["id", "check"] + models, rows))
    L.append("")
    L.append("## Conclusions")
    L.append("")
    for m in models:
        L.append(f"**{m}: {overall[m]}.** {conclusion(result, m)}")
        L.append("")
    measured = [m for m in models if m in result.log10_abs]  # an interrupted graph has none
    if len(measured) > 1:
        L.append("### The paper's two measurements")
        L.append("")
        zf = ", ".join(f"{m} {_fmt(st.loc[m, 'zero_fraction'], 'pct')}" for m in measured)
        L.append(f"- Share of exactly-zero entries in dL/dx: {zf}. (Paper: smaller for the "
                 "capsule model than for the CNN.)")
        ref = max(measured, key=lambda m: st.loc[m, "l1_q50"])
        for m in measured:
            if m == ref:
                continue
            row = result.magnitudes[(result.magnitudes["model"] == m)
                                    & (result.magnitudes["reference"] == ref)].iloc[0]
            L.append(f"- Gradient magnitude: median per-sample L1 norm of {m} / {ref} = "
                     f"{_fmt(row['median_l1_ratio'], 'e')}, i.e. {_fmt(row['log10_l1_ratio'])} "
                     "orders of magnitude (paper: capsules about -2 vs the CNN; Brendel & "
                     "Bethge's masked model: -16).")
        L.append("")
    L.append("## Gradient statistics")
    L.append("")
    keys = [
        ("zero_fraction", "exactly-zero entries", "pct"),
        ("below_1e-12_rel_fraction", "entries <= 1e-12 x sample max", "pct"),
        ("below_1e-20_rel_fraction", "entries <= 1e-20 x sample max", "pct"),
        ("all_zero_sample_fraction", "samples with an all-zero gradient", "pct"),
        ("unavailable_sample_fraction", "samples with unavailable gradient (P1)", "pct"),
        ("nan_count", "NaN entries", "g"),
        ("inf_count", "Inf entries", "g"),
        ("loss_median", "median attack loss", "e"),
        ("l1_q50", "median per-sample L1 norm", "e"),
        ("l2_q50", "median per-sample L2 norm", "e"),
        ("linf_q50", "median per-sample L-inf norm", "e"),
        ("l1_q05", "L1 norm, 5% quantile", "e"),
        ("l1_q95", "L1 norm, 95% quantile", "e"),
        ("log10_abs_q05", "log10 abs(g), 5% quantile", "g"),
        ("log10_abs_q50", "log10 abs(g), median", "g"),
        ("log10_abs_q95", "log10 abs(g), 95% quantile", "g"),
        ("f64_rel_diff_median", "float32 vs float64: median relative difference", "e"),
        ("f64_rel_diff_max", "float32 vs float64: max relative difference", "e"),
        ("f64_sign_agreement", "float32 vs float64: sign agreement", "pct"),
        ("fd_err_random_median", "finite differences, random d: median error", "e"),
        ("fd_err_grad_median", "finite differences, d = g/abs(g): median error", "e"),
        ("fd_mismatch_fraction", "samples with finite-difference error along g > 0.5", "pct"),
    ]
    rows = [[label] + [_fmt(st.loc[m, k], kind) if k in st.columns else "n/a" for m in models]
            for k, label, kind in keys]
    L.append(_table(["statistic"] + models, rows))
    L.append("")
    L.append("All statistics (every quantile, per model) are in `gradients.json` and "
             "`gradients.csv`; per-sample values in `gradient_samples.csv`.")
    L.append("")
    mag = result.magnitudes
    if len(mag):
        L.append("### Orders of magnitude between models")
        L.append("")
        rows = [[r["model"], r["reference"], _fmt(r["median_l1_ratio"], "e"),
                 f"{r['log10_l1_ratio']:+.2f}", f"{r['log10_linf_ratio']:+.2f}",
                 f"{r['median_log10_abs_diff']:+.2f}"] for _, r in mag.iterrows()]
        L.append(_table(["model", "reference", "median L1 ratio", "log10 (L1)", "log10 (L-inf)",
                         "median log10 abs(g) difference"], rows))
        L.append("")
        L.append("A negative log10 means the model's gradients are that many orders of magnitude "
                 "smaller than the reference's. The paper reports about -2 for capsules vs the "
                 "CNN; Brendel & Bethge (2017) found -16 for a masked model.")
        L.append("")
    for key, caption in (("fig_hist", "Distribution of log10 abs(dL/dx) over all input entries "
                          "(exact zeros excluded; their share is in the legend)."),
                         ("fig_norms", "Per-sample gradient norms.")):
        if key in figures:
            L.append(f"![{caption}]({figures[key].name})")
            L.append("")
            L.append(f"*{caption}*")
            L.append("")
    if cfg["attacks"] and len(result.curves):
        L.append("## Attack-based indicators")
        L.append("")
        cu = result.curves
        for m in measured:
            d = cu[cu["model"] == m]
            attacks = list(dict.fromkeys(d["attack"]))
            epss = sorted(d.loc[d["attack"] == "pgd", "epsilon"].unique())
            rows = []
            for a in attacks:
                if a == "pgd-unbounded":
                    continue
                s = d[d["attack"] == a].set_index("epsilon")["success_rate"]
                rows.append([a] + [_fmt(s.get(e, float("nan")), "pct") for e in epss])
            ub = d[d["attack"] == "pgd-unbounded"]
            L.append(f"**{m}** (success rate on {int(st.loc[m, 'attack_clean_correct'])} "
                     f"clean-correct samples; unbounded PGD: "
                     f"{_fmt(float(ub['success_rate'].iloc[0]), 'pct') if len(ub) else 'n/a'}; "
                     f"eps_ref = {st.loc[m, 'eps_ref']:g})")
            L.append("")
            L.append(_table(["attack \\ eps"] + [f"{e:g}" for e in epss], rows))
            L.append("")
        for key, caption in (("fig_curves", "Attack success vs epsilon: a gradient attack "
                              "should beat random noise, PGD should beat FGSM, and white-box "
                              "should beat transfer."),
                             ("fig_profile", "Attack loss and accuracy along x + t sign(grad) "
                              "(solid) and x + t random sign (dashed): an honest gradient "
                              "raises the loss and drops accuracy much faster than noise.")):
            if key in figures:
                L.append(f"![{caption}]({figures[key].name})")
                L.append("")
                L.append(f"*{caption}*")
                L.append("")
    elif "fig_profile" in figures:
        L.append(f"![Loss along the gradient direction]({figures['fig_profile'].name})")
        L.append("")
    if len(result.adaptive):
        L += adaptive_section(result)
    L.append("## Numbers behind each verdict")
    L.append("")
    rows = [[r["model"], r["id"], r["check"], BADGE[r["verdict"]], r["numbers"]]
            for _, r in result.verdicts.iterrows()]
    L.append(_table(["model", "id", "check", "verdict", "numbers"], rows))
    L.append("")
    L.append("## Method: formulas and thresholds")
    L.append("")
    L.append("Notation: L(x, y) is the model's attack loss, g = dL/dx its input gradient "
             "(D entries per sample), S(eps) a success rate on the samples the model "
             "classifies correctly, pp = percentage points. G-checks use the gradients alone, "
             "A-D are classic masking symptoms (Athalye et al. 2018; Carlini et al. 2019), "
             "P1-P6 are the Indicators of Attack Failure of Pintor et al. (2022). Check C and "
             "P6 share the unbounded PGD run; C also checks the shape of the accuracy curve, "
             "P6 counts samples.")
    L.append("")
    rows = [[c["id"], c["name"], c["formula"].replace("|", "\\|"), c["rule"].replace("|", "\\|")]
            for c in CHECKS]
    L.append(_table(["id", "check", "formula", "verdict rule"], rows))
    L.append("")
    L.append("### Departures from the reference implementation")
    L.append("")
    L.append("P1-P6 follow the authors' code (pralab/IndicatorsOfAttackFailure, "
             "`src/indicators/indicators.py`) except where listed:")
    L.append("")
    L.append(_table(["indicator", "deviation", "reason"],
                    [[d["id"], d["deviation"], d["reason"]] for d in DEVIATIONS]))
    L.append("")
    L.append("### Why the loss matters: probabilities vs logits")
    L.append("")
    L.append(
        "Every number above is for the model's *attack loss*. For a saturated softmax (the "
        "setting of Brendel & Bethge 2017 and of defensive distillation), a loss computed from "
        "the float32 probabilities, e.g. -log p_y with p_y rounded to exactly 1 and the other "
        "p_j underflowed to 0, has an exactly-zero gradient although the decision boundary is "
        "as close as ever: gradient attacks stall and the model looks robust. Cross-entropy on "
        "the logits is better but its gradient, (softmax(z) - onehot(y)) dz/dx, still "
        "underflows once logit gaps exceed about 100 in float32. The logit margin "
        "max_{j != y} z_j - z_y (`--loss cw`) has gradient dz_j/dx - dz_y/dx whatever the "
        "saturation. The test suite proves the checks on such a model: with the loss on the "
        "probabilities P1, G1 and D fail; with the logit margin every check passes. If a "
        "model fails P1/G1 here, rerun with `--loss cw` before trusting its robustness."
    )
    L.append("")
    L.append("## Files")
    L.append("")
    L.append("`gradients.json` (every statistic, verdict and curve, plus the configuration), "
             "`gradients.csv` (one row per model), `verdicts.csv`, `attack_curves.csv`, "
             "`gradient_samples.csv` (per-sample gradient numbers) and the figures above.")
    L.append("")
    path = out / "gradient_report.md"
    path.write_text("\n".join(L))
    return path
