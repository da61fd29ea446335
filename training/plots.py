"""The evaluation report's figures (PNG, written atomically)."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from returns_model.fileio import write_bytes  # noqa: E402
from training.calibrate import expected_calibration_error  # noqa: E402
from training.promotion import promotion_of  # noqa: E402

MIN_BIN_ITEMS = 5


def _save(fig: plt.Figure, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_bytes(path, buf.getvalue())


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, class_names: list[str], path: Path) -> None:
    k = len(class_names)
    cm = torch.bincount(labels * k + pred, minlength=k * k).view(k, k)
    rates = cm.double() / cm.sum(1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(0.75 * k + 2, 0.75 * k + 1.5))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix (test, n={len(labels)}, accuracy {float((pred == labels).double().mean()):.2%})")
    _save(fig, path)


def reliability_diagram(raw_conf: torch.Tensor, conf: torch.Tensor, correct: torch.Tensor, path: Path,
                        bins: int = 15) -> None:
    edges = torch.linspace(0, 1, bins + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharey=True)
    for ax, c, title in ((axes[0], raw_conf, "before calibration"), (axes[1], conf, "after temperature scaling")):
        xs, accs, counts = [], [], []
        for lo, hi in zip(edges[:-1], edges[1:]):
            m = (c > lo) & (c <= hi)
            if int(m.sum()) >= MIN_BIN_ITEMS:  # a bar from 1-2 items says nothing and draws the eye
                xs.append(float(c[m].mean()))
                accs.append(float(correct[m].double().mean()))
                counts.append(int(m.sum()))
        ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
        ax.bar(xs, accs, width=1 / bins, edgecolor="black", alpha=0.7,
               label=f"accuracy in bin (bins of >= {MIN_BIN_ITEMS} items)")
        for x, a, n in zip(xs, accs, counts):
            ax.text(x, min(a, 0.93) + 0.02, str(n), ha="center", fontsize=6)
        ax.set_xlabel("confidence")
        ax.set_title(f"{title}: ECE {expected_calibration_error(c, correct):.2%}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(loc="upper left")
    axes[0].set_ylabel("accuracy")
    _save(fig, path)


def risk_coverage_curve(curves: dict[str, tuple[torch.Tensor, torch.Tensor]], cert, served: dict[str, float],
                        path: Path) -> None:
    """Risk against coverage (most confident first) per split, with the certified threshold's
    operating points and the risk the guarantee promises not to exceed."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, (coverage, risk) in curves.items():
        ax.plot(coverage.numpy(), risk.numpy(), label=f"{name} (AURC {float(risk.mean()):.4f})")
    alpha = 1 - cert.target_precision
    ax.axhline(alpha, ls="--", color="grey", label=f"risk target {alpha:.0%} (precision {cert.target_precision:.0%})")
    if not cert.accept_nothing:
        ax.plot([cert.coverage], [1 - cert.observed_precision], "o", color="black",
                label=f"certified on validation: t={cert.threshold:.3f}, bound {1 - cert.precision_lower_bound:.2%} "
                      f"(delta {cert.delta:g})")
    for name, cov in served.items():
        ax.axvline(cov, ls=":", color="red", label=f"{name}: {cov:.1%} auto-accepted (served rule)")
    ax.set_xlabel("coverage (share auto-accepted, most confident first)")
    ax.set_ylabel("risk (error rate of accepted items)")
    ax.set_title("Risk-coverage and the certified threshold")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 0.08)
    ax.legend(fontsize=7, loc="upper left")
    _save(fig, path)


def unfamiliar_histograms(ordinary: torch.Tensor, kinds: dict[str, torch.Tensor], cutoff: float, path: Path) -> None:
    """The gate's score for ordinary test photos and for each kind of unfamiliar photo."""
    fig, ax = plt.subplots(figsize=(10.5, 4.8))
    hi = float(max([ordinary.max()] + [v.max() for v in kinds.values()]))
    bins = torch.linspace(float(min([ordinary.min()] + [v.min() for v in kinds.values()])), min(hi, 12.0), 80).numpy()
    ax.hist(ordinary.clamp(max=bins[-1]).numpy(), bins=bins, density=True, alpha=0.6, color="black",
            label=f"ordinary test photos (n={len(ordinary)})")
    colours = plt.get_cmap("tab20").colors  # one colour per kind (the default cycle repeats after 10)
    for i, (name, v) in enumerate(kinds.items()):  # past 20 kinds the colours repeat, dashed
        ax.hist(v.clamp(max=bins[-1]).numpy(), bins=bins, density=True, histtype="step", label=name,
                color=colours[i % len(colours)], lw=1.2, ls="-" if i < len(colours) else "--")
    ax.axvline(cutoff, color="red", ls="--", label=f"cutoff {cutoff:.3f} (2% of validation)")
    ax.set_xlabel("unfamiliarity score (clipped at 12)")
    ax.set_ylabel("density")
    ax.set_title("Unfamiliar-photo gate: ordinary vs unfamiliar photos")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the plot, not over it
    _save(fig, path)


def routed_shares(shares: dict[str, dict[str, float]], path: Path) -> None:
    """Share of each kind sent to review, split by reason."""
    names = list(shares)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.7 * len(names)), 4.6))
    x = range(len(names))
    ax.bar(x, [shares[n]["routed_to_review"] for n in names], color="tab:blue", label="routed to review")
    ax.bar(x, [shares[n]["flagged_unfamiliar"] for n in names], width=0.4, color="tab:orange",
           label="of which flagged unfamiliar")
    ax.axhline(0.95, ls="--", color="grey", label="target 95%")
    for i, n in enumerate(names):
        ax.text(i, min(shares[n]["routed_to_review"] + 0.01, 1.02), f"{shares[n]['routed_to_review']:.1%}",
                ha="center", fontsize=7)
    ax.set_xticks(list(x), [f"{n}\n({shares[n]['group']})" for n in names], fontsize=7, rotation=35, ha="right")
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("share of photos")
    ax.set_title("Where unfamiliar photos go (ordinary test photos for comparison)")
    ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.06), ncol=3, frameon=False)
    fig.tight_layout()
    _save(fig, path)


def tsne_embeddings(feats: torch.Tensor, labels: torch.Tensor, class_names: list[str], path: Path, seed: int = 0) -> None:
    from sklearn.manifold import TSNE

    xy = TSNE(n_components=2, init="pca", perplexity=30, random_state=seed).fit_transform(feats.numpy())
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    cmap = plt.get_cmap("tab20" if len(class_names) > 10 else "tab10")
    for k, name in enumerate(class_names):
        m = (labels == k).numpy()
        ax.scatter(xy[m, 0], xy[m, 1], s=4, color=cmap(k % cmap.N), label=name)
    ax.set_title(f"t-SNE of penultimate-layer embeddings (test, n={len(labels)})")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(markerscale=3, fontsize=7, loc="best")
    _save(fig, path)


def champion_challenger(comparison: dict, path: Path) -> None:
    """Left: accuracy and auto-accepted share of both models on each set, with the 95% interval of the
    difference written above. Right: the change in each class's test accuracy."""
    sets = list(comparison["sets"])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1.3, 1]})
    width, x = 0.2, torch.arange(len(sets)).float()
    for j, (model, metric, colour) in enumerate([("champion", "accuracy", "#9ecae1"), ("challenger", "accuracy", "#3182bd"),
                                                 ("champion", "coverage", "#fdae6b"), ("challenger", "coverage", "#e6550d")]):
        vals = [comparison["sets"][s][model][metric] for s in sets]
        ax.bar((x + (j - 1.5) * width).tolist(), vals, width, color=colour, label=f"{model} {metric}")
    for i, s in enumerate(sets):
        d = comparison["sets"][s]["difference"]["coverage"]
        ax.text(i, 1.04, f"Δcov {100 * d['value']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]",
                ha="center", fontsize=7)
    ax.set_xticks(x.tolist(), [f"{s}\n(n={comparison['sets'][s]['n']})" for s in sets], fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.set_title(f"champion vs challenger: {'PROMOTE' if promotion_of(comparison)['promote'] else 'KEEP champion'}")
    ax.legend(fontsize=7, loc="lower left")
    per_class = comparison["sets"]["test"]["per_class_accuracy_change"]
    names = list(per_class)
    ax2.barh(names, [100 * per_class[n] for n in names], color=["#31a354" if per_class[n] >= 0 else "#de2d26" for n in names])
    ax2.axvline(0, color="black", lw=0.8)
    ax2.set_xlabel("test accuracy change per class (points)")
    ax2.invert_yaxis()
    _save(fig, path)
