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


def risk_coverage_curve(coverage: torch.Tensor, risk: torch.Tensor, thr, test_coverage: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(coverage.numpy(), risk.numpy(), label="test set")
    ax.axhline(1 - thr.target_precision, ls="--", color="grey", label=f"risk target {1 - thr.target_precision:.0%}")
    ax.axvline(test_coverage, ls=":", color="red",
               label=f"threshold {thr.threshold:.3f}: {test_coverage:.1%} auto-accepted")
    ax.set_xlabel("coverage (share auto-accepted, most confident first)")
    ax.set_ylabel("risk (error rate of accepted items)")
    ax.set_title(f"Risk-coverage (AURC {float(risk.mean()):.4f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, max(0.12, float(risk.max()) * 1.05))
    ax.legend()
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
