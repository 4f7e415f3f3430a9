"""Writing an evaluation: metrics.json, report.md, ROC / PR plots, per-volume scores.

Plots use matplotlib's Agg backend (no display needed); one panel per abnormality.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Sequence

import numpy as np

METRICS_FILE, REPORT_FILE, HTML_FILE = "metrics.json", "report.md", "report.html"
ROC_FILE, PR_FILE, SCORES_FILE = "roc_curves.png", "pr_curves.png", "scores.csv"


def json_safe(value: Any) -> Any:
    """Strict JSON: NaN -> null (undefined), +-inf -> "inf" / "-inf" (a threshold of
    inf calls nothing positive), numpy scalars -> Python numbers."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if np.isnan(value):
            return None
        return value if np.isfinite(value) else ("inf" if value > 0 else "-inf")
    return value


def write_json(path: str, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(json_safe(value), f, indent=1, allow_nan=False)
        f.write("\n")


def write_scores_csv(path: str, volume_names: Sequence[str], names: Sequence[str],
                     labels: np.ndarray, scores: np.ndarray) -> None:
    """One row per volume: VolumeName, the labels under the CT-RATE column names (so
    that the file joins with the release's label CSV), then "score: <name>" columns."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["VolumeName", *names, *(f"score: {n}" for n in names)])
        for row, volume in enumerate(volume_names):
            writer.writerow([volume, *(_label_cell(x) for x in labels[row]),
                             *(repr(float(s)) for s in scores[row])])


def _label_cell(x: float) -> str:
    return str(int(x)) if x in (0, 1) else ""  # unknown labels stay empty


# ----------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------

def _grid(num: int, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(6, num)
    rows = math.ceil(num / cols)
    figure, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.0 * rows), squeeze=False)
    figure.suptitle(title)
    for ax in axes.flat[num:]:
        ax.axis("off")
    return plt, figure, axes.flat


def _known(labels: np.ndarray, scores: np.ndarray, c: int):
    known = (labels[:, c] == 0) | (labels[:, c] == 1)
    return labels[known, c].astype(int), scores[known, c]


def plot_roc_curves(path: str, names: Sequence[str], labels: np.ndarray, scores: np.ndarray,
                    thresholds: np.ndarray | None = None, title: str = "ROC curves") -> None:
    """A grid of ROC curves, one per class, with AUROC and (optionally) the operating
    point of each class's threshold."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt, figure, axes = _grid(len(names), title)
    for c, (ax, name) in enumerate(zip(axes, names)):
        y, s = _known(labels, scores, c)
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        if 0 < y.sum() < y.size:
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(fpr, tpr, lw=1.2)
            if thresholds is not None and not np.isnan(thresholds[c]):
                called = s >= thresholds[c]
                ax.plot(called[y == 0].mean(), called[y == 1].mean(), "o", ms=4)
            ax.set_title(f"{name}\nAUROC {roc_auc_score(y, s):.3f}", fontsize=8)
        else:
            ax.set_title(f"{name}\nAUROC n/a (one label value)", fontsize=8)
        _label_axes(ax, "1 - specificity", "sensitivity", top=1.0)
    _save(plt, figure, path)


def plot_pr_curves(path: str, names: Sequence[str], labels: np.ndarray, scores: np.ndarray,
                   title: str = "Precision-recall curves") -> None:
    """A grid of precision-recall curves, with average precision and the prevalence
    (the precision of a random ranking) as a dashed line."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    plt, figure, axes = _grid(len(names), title)
    for c, (ax, name) in enumerate(zip(axes, names)):
        y, s = _known(labels, scores, c)
        if y.sum() > 0:
            precision, recall, _ = precision_recall_curve(y, s)
            ax.step(recall, precision, where="post", lw=1.2)
            ax.axhline(y.mean(), color="0.7", lw=0.8, ls="--")
            ax.set_title(f"{name}\nAP {average_precision_score(y, s):.3f} "
                         f"(prevalence {y.mean():.2f})", fontsize=8)
        else:
            ax.set_title(f"{name}\nAP n/a (no positives)", fontsize=8)
        _label_axes(ax, "recall", "precision", top=1.02)
    _save(plt, figure, path)


def _label_axes(ax, xlabel: str, ylabel: str, top: float) -> None:
    """Unit square axes with small labels (the grids hold 18 panels)."""
    ax.set_xlim(0, 1), ax.set_ylim(0, top)
    ax.tick_params(labelsize=6)
    ax.set_xlabel(xlabel, fontsize=7), ax.set_ylabel(ylabel, fontsize=7)


def _save(plt, figure, path: str) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ----------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------

def _f(x, digits: int = 3) -> str:
    if isinstance(x, str):  # "inf" / "-inf" thresholds
        return x
    return "n/a" if x is None or np.isnan(x) else f"{x:.{digits}f}"


def _ci(record: dict | None) -> str:
    if not record or record.get("low") is None:
        return ""
    return f" ({_f(record['low'])}–{_f(record['high'])})"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def _zero_shot_md(section: dict) -> list[str]:
    ci = section.get("auroc_ci", {})
    rows = [[name, str(section["positives"][name]),
             _f(auroc) + _ci(ci.get(name))] for name, auroc in section["auroc"].items()]
    rows.append(["**mean (macro)**", "", f"**{_f(section['mean_auroc'])}**"
                 + _ci(section.get("macro_auroc_ci"))])
    if "weighted_auroc_ci" in section:
        rows.append(["weighted by positives", "",
                     _f(section["weighted_auroc_ci"]["estimate"])
                     + _ci(section["weighted_auroc_ci"])])
    if section.get("templates"):
        pos, neg = section["templates"]
        title, how = "Zero-shot abnormality detection", f"Prompts `{pos}` / `{neg}`, "
    else:
        title, how = "Abnormality detection, ClassFine head", ""
    return [f"## {title}", "",
            f"{how}{section['score']}; {section['num_volumes']} "
            "volumes." + (" AUROC with 95 % bootstrap interval." if ci else ""), "",
            *_table(["abnormality", "positives", "AUROC"], rows)]


def _classification_md(title: str, section: dict | None) -> list[str]:
    if section is None:
        return []
    metrics = ("f1", "f1_two_class_weighted", "accuracy", "precision", "recall",
               "specificity")
    ci = section.get("confidence_intervals", {})
    rows = []
    for name, values in section["per_class"].items():
        rows.append([name, _f(values["threshold"]), *(
            _f(values[m]) + _ci(ci.get(m, {}).get("per_class", {}).get(name))
            for m in metrics)])
    for average in ("macro", "weighted"):
        rows.append([f"**{average}**", "", *(
            _f(section[average][m]) + _ci(ci.get(m, {}).get(average)) for m in metrics)])
    return [f"## {title}", "", f"Thresholds: {section['protocol']}.", "",
            *_table(["abnormality", "threshold", "F1 (present)", "F1 (weighted, paper)",
                     "accuracy", "precision", "sensitivity", "specificity"], rows)]


def _retrieval_md(section: dict) -> list[str]:
    lines = ["## Retrieval", ""]
    v2v = section["volume_to_volume"]
    if v2v["ks"]:
        rows = [[label, *(_f(v2v[key][str(k)]) for k in v2v["ks"])] for label, key in (
            ("MAP@k (CT-CLIP relevance, ours)", "map_at_k"),
            ("MAP@k (original's settings)", "map_at_k_original_settings"),
            ("binary MAP@k (textbook)", "binary_map_at_k"),
            ("random embeddings", "random_embedding_map_at_k"))]
        lines += ["### Volume → volume", "", f"Protocol: {v2v['protocol']}.", "",
                  *_table(["", *(f"k={k}" for k in v2v["ks"])], rows)]
    if "report_to_volume" in section:
        r2v = section["report_to_volume"]
        rows = [[label, *(_f(r2v[key][str(k)]) for k in r2v["ks"])] for label, key in (
            ("CT-CLIP", "recall_at_k"), ("random embeddings", "random_embedding_recall_at_k"),
            ("chance (k / N)", "chance_recall_at_k"))]
        lines += ["### Report → volume, Recall@k", "",
                  *_table(["", *(f"R@{k}" for k in r2v["ks"])], rows)]
        std = section["standard"]
        rows = [[direction.replace("_to_", " → "),
                 *(_f(std[direction][f"R@{k}"]) for k in std["ks"])]
                for direction in ("report_to_volume", "volume_to_report")]
        lines += ["### Image–text retrieval (standard)", "",
                  *_table(["", *(f"R@{k}" for k in std["ks"])], rows)]
    return lines


def _detection(metrics: dict) -> dict:
    """The AUROC section: "zero_shot" (prompts) or "classfine" (a linear head)."""
    return metrics["zero_shot"] if "zero_shot" in metrics else metrics["classfine"]


def markdown_report(metrics: dict) -> str:
    """report.md: provenance, then one table per task, then notes."""
    run = metrics["run"]
    data = run["data"]["test"]
    lines = ["# CT-CLIP evaluation", "",
             f"* checkpoint: `{run['checkpoint']['path']}` ({run['checkpoint']['kind']}"
             + (f", step {run['checkpoint']['step']}" if run['checkpoint'].get('step') else "")
             + ")",
             f"* data: `{data['path']}` ({data.get('num_records', '?')} records, manifest "
             f"sha256 `{str(data.get('manifest_sha256', ''))[:12]}`)",
             f"* model: {run.get('model_kind', 'CT-CLIP')}",
             f"* date: {run['date']}; devices: {run['devices']}", ""]
    if metrics.get("label_mapping"):
        mapping = metrics["label_mapping"]
        rows = [[target, ", ".join(members)] for target, members in mapping["classes"].items()]
        lines += [f"Every number is in the mapped label set ({len(rows)} classes; scores "
                  f"of several CT-RATE classes merged by `{mapping['merge']}`; labels "
                  "present if any member is present).", "",
                  *_table(["class", "CT-RATE columns"], rows)]
    lines += _zero_shot_md(_detection(metrics))
    lines += _classification_md("Classification, protocol (a) — OPTIMISTIC "
                                "(thresholds fitted on this data)",
                                metrics["classification"]["optimistic"])
    lines += _classification_md("Classification, protocol (b) — held-out thresholds",
                                metrics["classification"]["held_out"])
    lines += _retrieval_md(metrics["retrieval"])
    if metrics.get("notes"):
        lines += ["## Notes", "", *(f"* {note}" for note in metrics["notes"]), ""]
    return "\n".join(lines)


def write_report(directory: str, metrics: dict, volume_names: Sequence[str],
                 names: Sequence[str], labels: np.ndarray, scores: np.ndarray,
                 thresholds: np.ndarray | None = None) -> dict[str, str]:
    """Writes the six output files into `directory`; returns {kind: path}."""
    from ct_rate_jax.evaluation import html_report

    os.makedirs(directory, exist_ok=True)
    paths = {k: os.path.join(directory, f) for k, f in (
        ("metrics", METRICS_FILE), ("report", REPORT_FILE), ("html", HTML_FILE),
        ("roc", ROC_FILE), ("pr", PR_FILE), ("scores", SCORES_FILE))}
    metrics = json_safe(metrics)
    write_json(paths["metrics"], metrics)
    markdown = markdown_report(metrics)
    with open(paths["report"], "w", encoding="utf-8") as f:
        f.write(markdown)
    kind = "Zero-shot" if "zero_shot" in metrics else "ClassFine"
    plot_roc_curves(paths["roc"], names, labels, scores, thresholds,
                    f"{kind} ROC curves (dot: protocol (a) threshold, optimistic)")
    plot_pr_curves(paths["pr"], names, labels, scores, f"{kind} precision-recall curves")
    write_scores_csv(paths["scores"], volume_names, names, labels, scores)
    html_report.write_html(paths["html"], markdown,
                           {"ROC curves": paths["roc"], "Precision-recall curves": paths["pr"]})
    return paths
