"""Seaborn figures (PNG + SVG) built from the summary table and saved adversarial examples.

- ``accuracy_vs_epsilon``: a line per model, a panel per attack (the paper's Fig. 3 left).
- ``targeted_success_vs_epsilon``: the same for targeted success rate (Fig. 3 right).
- ``transfer_heatmap``: accuracy of every target model on examples crafted on a source,
  target x epsilon, a panel per (source, crafting attack).
- ``adversarial_examples``: clean and adversarial inputs at two epsilons (Fig. B.3).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

FORMATS = ("png", "svg")
#: Without a fixed salt, SVG element ids are random per process.
matplotlib.rcParams["svg.hashsalt"] = "robustcaps"


def save_figure(fig, path: Path, dpi: int = 130, **kwargs) -> Path:  # noqa: ANN001
    """Save ``fig`` so that the same figure gives the same bytes: no creation date in SVG or
    PDF metadata (PNG carries none), fixed SVG ids."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"Date": None} if path.suffix in (".svg", ".pdf") else None
    fig.savefig(path, dpi=dpi, metadata=metadata, **kwargs)
    return path


def _save(fig, out_dir: Path, name: str) -> list[Path]:
    paths = [save_figure(fig, out_dir / f"{name}.{ext}", bbox_inches="tight") for ext in FORMATS]
    plt.close(fig)
    return paths


def _eps_label(summary: pd.DataFrame) -> str:
    units = ""
    if "eps_units" in summary and summary["eps_units"].notna().any():
        units = str(summary["eps_units"].dropna().iloc[0])
    return f"epsilon ({units})" if units else "epsilon (L-inf, input units)"


def _curve_plot(summary: pd.DataFrame, value: str, ylabel: str, title: str, chance: float | None,
                out_dir: Path, name: str) -> list[Path]:
    s = summary.copy()
    s["value"] = s[value] * 100
    s["lo"] = s["ci_low"] * 100
    s["hi"] = s["ci_high"] * 100
    attacks = list(dict.fromkeys(s["attack"]))
    backends = list(dict.fromkeys(s["backend"]))
    models = list(dict.fromkeys(s["model"]))
    palette = dict(zip(models, sns.color_palette("colorblind", len(models)), strict=True))
    styles = ["-", "--", ":", "-."]
    sns.set_theme(style="whitegrid", context="notebook")
    fig, axes = plt.subplots(1, len(attacks), figsize=(4.8 * len(attacks) + 1.8, 4.0),
                             squeeze=False, sharey=True)
    for ax, attack in zip(axes[0], attacks, strict=True):
        part = s[s["attack"] == attack]
        for (model, backend), grp in part.groupby(["model", "backend"], sort=False):
            grp = grp.sort_values("epsilon")
            ls = styles[backends.index(backend) % len(styles)]
            label = model if len(backends) == 1 else f"{model} ({backend})"
            ax.plot(grp["epsilon"], grp["value"], ls, marker="o", ms=4, color=palette[model],
                    label=label)
            ax.fill_between(grp["epsilon"], grp["lo"], grp["hi"], color=palette[model], alpha=0.15,
                            linewidth=0)
        if chance is not None:
            ax.axhline(chance, color="grey", lw=1, ls=":", label="chance")
        ax.set_title(attack.upper() if "-" not in attack else attack)
        ax.set_xlabel(_eps_label(s))
        ax.set_ylim(-2, 102)
    axes[0][0].set_ylabel(ylabel)
    seen: dict[str, object] = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    fig.legend(list(seen.values()), list(seen.keys()), loc="center left",
               bbox_to_anchor=(1.0, 0.5), frameon=False, title="model")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out_dir, name)


def plot_accuracy_vs_epsilon(summary: pd.DataFrame, out_dir: Path,
                             num_classes: int | None = None) -> list[Path]:
    """Untargeted accuracy (%) vs epsilon; 95% Wilson bands. Empty list if no such rows."""
    s = summary[~summary["targeted"].astype(bool) & ~summary["attack"].str.startswith("transfer")]
    if s.empty:
        return []
    chance = 100.0 / num_classes if num_classes else None
    return _curve_plot(s, "accuracy", "accuracy under attack (%)",
                       "Untargeted white-box attacks", chance, out_dir, "accuracy_vs_epsilon")


def plot_targeted_success(summary: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Targeted success rate (%, averaged over target classes) vs epsilon."""
    s = summary[summary["targeted"].astype(bool) & ~summary["attack"].str.startswith("transfer")]
    if s.empty:
        return []
    return _curve_plot(s, "success_rate", "targeted success rate (%)",
                       "Targeted white-box attacks (mean over target classes)", None, out_dir,
                       "targeted_success_vs_epsilon")


def plot_transfer_heatmap(summary: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Accuracy (%) of each target model on examples crafted on the source, per epsilon."""
    s = summary[summary["attack"].str.startswith("transfer") & ~summary["targeted"].astype(bool)]
    if s.empty:
        return []
    panels = list(dict.fromkeys(zip(s["source"], s["attack"], strict=True)))
    sns.set_theme(style="white", context="notebook")
    n_eps = s["epsilon"].nunique()
    n_models = s["model"].nunique()
    fig, axes = plt.subplots(1, len(panels), squeeze=False,
                             figsize=(max(5.0, 0.62 * n_eps + 2.6) * len(panels),
                                      0.55 * n_models + 2.2))
    for ax, (source, attack) in zip(axes[0], panels, strict=True):
        part = s[(s["source"] == source) & (s["attack"] == attack)]
        mat = part.pivot_table(index="model", columns="epsilon", values="accuracy",
                               sort=False) * 100
        mat.columns = [f"{c:g}" for c in mat.columns]
        sns.heatmap(mat, ax=ax, annot=True, fmt=".0f", vmin=0, vmax=100, cmap="rocket",
                    cbar_kws={"label": "accuracy on transferred examples (%)"},
                    annot_kws={"fontsize": 8})
        ax.set_title(f"{attack.replace('transfer-', '').upper()} examples crafted on {source}")
        ax.set_xlabel(_eps_label(s))
        ax.set_ylabel("target model")
        ax.tick_params(axis="y", rotation=0)
    fig.tight_layout()
    return _save(fig, out_dir, "transfer_heatmap")


def _pick_epsilons(eps: np.ndarray, wanted: tuple[float, float] = (0.1, 0.4)) -> list[int]:
    """Indices of the grid epsilons closest to the paper's Fig. B.3 values (0.1 and 0.4)."""
    nonzero = [i for i, e in enumerate(eps) if e > 0]
    if not nonzero:
        return [0]
    picks = []
    for w in wanted:
        i = min(nonzero, key=lambda j: abs(eps[j] - w))
        if i not in picks:
            picks.append(i)
    return sorted(picks, key=lambda i: eps[i])


def plot_adversarial_examples(example_files: list[Path], out_dir: Path,
                              class_names: list[str] | None = None,
                              eps_units: str | None = None) -> list[Path]:
    """Grid like Fig. B.3: a row per sample; the clean input, then per model two epsilons.

    Each ``.npz`` holds ``x`` (S, C, H, W), ``x_adv`` (E, S, C, H, W), ``epsilons`` (E,),
    ``label``, ``clean_pred`` (S,), ``adv_pred`` (E, S) and the strings ``model``/``attack``
    for the same first S samples of the run. FGSM examples are shown when present (as in
    the paper), else BIM. The first input channel is drawn in grey; red titles mark
    misclassified inputs.
    """
    if not example_files:
        return []
    data = [dict(np.load(f, allow_pickle=False)) for f in example_files]
    attacks = [str(d["attack"]) for d in data]
    chosen = "fgsm" if "fgsm" in attacks else attacks[0]
    data = [d for d in data if str(d["attack"]) == chosen]
    n_rows = min(d["x"].shape[0] for d in data)
    picks = [_pick_epsilons(d["epsilons"]) for d in data]
    columns: list[tuple[dict | None, int | None]] = [(None, None)]  # the clean input
    for d, p in zip(data, picks, strict=True):
        columns += [(d, e) for e in p]
    n_cols = len(columns)
    sns.set_theme(style="white")
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.9 * n_cols, 2.05 * n_rows + 0.5),
                             squeeze=False)

    def name(k: int) -> str:
        return class_names[k] if class_names and 0 <= k < len(class_names) else str(k)

    ref = data[0]
    for r in range(n_rows):
        label = int(ref["label"][r])
        clean = ref["x"][r][0]
        lo, hi = float(clean.min()), float(clean.max())
        for c, (d, e) in enumerate(columns):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if d is None:
                img, title, pred = clean, "clean input", None
            else:
                img = d["x_adv"][e, r][0]
                pred = int(d["adv_pred"][e, r])
                title = f"{d['model']}\neps={d['epsilons'][e]:g}"
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
            if r == 0:
                ax.set_title(title, fontsize=8)
            if pred is None:
                ax.set_ylabel(f"true: {name(label)}", fontsize=8)
            else:
                ax.set_xlabel(f"pred: {name(pred)}", fontsize=8,
                              color="black" if pred == label else "crimson")
    units = f"; epsilon in {eps_units}" if eps_units else ""
    fig.suptitle(f"{chosen.upper()} adversarial examples{units} (red: misclassified)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return _save(fig, out_dir, "adversarial_examples")


def plot_auto_breakdown(breakdown: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Robust accuracy (targeted: success) vs epsilon of the worst case up to each
    component of ``auto`` (the last curve is the worst case); one panel per model and mode."""
    if breakdown.empty:
        return []
    panels = list(breakdown.groupby(["model", "targeted"], sort=False))
    sns.set_theme(style="whitegrid", context="notebook")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels) + 1.8, 4.0),
                             squeeze=False, sharey=True)
    for ax, ((model, targeted), grp) in zip(axes[0], panels, strict=True):
        comps = list(dict.fromkeys(grp["component"]))
        for i, comp in enumerate(comps):
            c = grp[grp["component"] == comp].sort_values("epsilon")
            last = i == len(comps) - 1
            ax.plot(c["epsilon"], 100 * c["value_after"], "-" if last else "--", marker="o",
                    ms=4, lw=2.5 if last else 1.2,
                    label=f"auto (worst case, after {comp})" if last else f"after {comp}")
        ax.set_title(f"{model} ({'targeted' if targeted else 'untargeted'})")
        ax.set_xlabel(_eps_label(grp))
        ax.set_ylim(-2, 102)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("accuracy (targeted: success) %")
    fig.suptitle("auto: worst case per sample, component by component")
    fig.tight_layout()
    return _save(fig, out_dir, "auto_breakdown")
