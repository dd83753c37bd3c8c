"""``report.md`` and PNG plots from an evaluation result, for people rather than programs.

The tables read the same structure that ``metrics.json`` holds; the score histograms also need
the per-row scores that :func:`~mlpm_guard.toolkit.evaluation.evaluate` returns under ``_scores``.
matplotlib is optional (the ``plots`` extra): without it the report has tables only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_write_text
from ..vocabulary.errors import ConfigError

logger = logging.getLogger(__name__)

MLPM = "MLPM"
_ROUTE_COLOURS = {"pass": "#4caf50", "safety_prompt": "#2196f3", "steer": "#ff9800", "refuse": "#e53935",
                  "unknown": "#9e9e9e"}


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _pct(v: Any) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _numeric(cell: Any) -> bool:
    text = str(cell).strip("*%").replace("–", "0")
    try:
        float(text)
    except ValueError:
        return False
    return True


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; columns whose first row is a number are right-aligned."""
    align = ["---:" if rows and _numeric(c) else "---" for c in rows[0]] if rows else ["---"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _methods(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """MLPM first, then the baselines, each with ``datasets``/``avg_f1``/... keys."""
    out = {MLPM: result} if "datasets" in result else {}
    out.update(result.get("baselines") or {})
    return out


# ---------------------------------------------------------------------------- markdown
def _moderation_section(result: dict[str, Any]) -> str:
    cols = ["n", "n_unsafe", "f1", "precision", "recall", "flag_rate_safe", "auroc", "auprc", "ece", "brier"]
    rows = [[f"`{name}`", *(_fmt(m.get(c)) for c in cols)] for name, m in result["datasets"].items()]
    rows.append(["**average F1**", "", "", f"**{_fmt(result.get('avg_f1'))}**", *[""] * 7])
    text = (f"## Moderation metrics (MLPM)\n\nThreshold {_fmt(result.get('threshold'))} on P(unsafe); unsafe is the "
            "positive class; flag_rate_safe is the share of safe prompts flagged; ECE and Brier measure "
            "calibration (lower is better).\n\n")
    return text + _table(["dataset", *cols], rows)


def _baselines_section(result: dict[str, Any]) -> str:
    methods = _methods(result)
    if len(methods) < 2:
        return ""
    text = "## Baselines on the same prompts\n\n"
    for name, block in result["baselines"].items():
        text += f"- **{name}**: {block.get('description', '')} (threshold {_fmt(block.get('threshold'))})\n"
    for key, title in (("f1", "F1"), ("auroc", "AUROC"), ("flag_rate_safe", "flag rate on safe prompts")):
        rows = [[f"`{stem}`", *(_fmt(b["datasets"][stem].get(key)) for b in methods.values())]
                for stem in result["datasets"]]
        if key == "f1":
            rows.append(["**average**", *(f"**{_fmt(b.get('avg_f1'))}**" for b in methods.values())])
        text += f"\n{title}:\n\n" + _table(["dataset", *methods], rows)
    return text + "\n"


def _target_section(result: dict[str, Any]) -> str:
    if "target" not in result:
        return ""
    methods = {k: v for k, v in _methods(result).items() if "target" in v}
    t = result["target"]
    text = (f"## At a target flag rate\n\nEach method's threshold is set so that at most "
            f"{_pct(t['target_flag_rate'])} of the safe prompts of `{t['benign']}` ({t['n_benign']} prompts) are "
            "flagged; the flag rate on that same set is therefore in-sample. Pass a separate benign file as "
            "`--benign` for an out-of-sample rate.\n\n")
    rows = [[name, _fmt(b["target"]["threshold"], 4), _pct(b["target"]["flag_rate"]), _fmt(b.get("avg_f1_at_target"))]
            for name, b in methods.items()]
    text += _table(["method", "threshold", "benign flag rate", "average F1"], rows)
    rows = [[f"`{stem}`", *(f"{_fmt(b['datasets'][stem]['at_target']['recall'])} / "
                            f"{_pct(b['datasets'][stem]['at_target']['flag_rate_safe'])}" for b in methods.values())]
            for stem in result["datasets"]]
    return text + "\nRecall / flag rate on safe prompts, per dataset, at those thresholds:\n\n" + \
        _table(["dataset", *methods], rows) + "\n"


def _jailbreak_section(result: dict[str, Any]) -> str:
    if not result.get("jailbreaks"):
        return ""
    methods = {k: v for k, v in _methods(result).items() if v.get("jailbreaks")}
    stems = list(result["jailbreaks"])
    framings = list(next(iter(result["jailbreaks"].values()))["recall"])
    text = ("## Jailbreak framings\n\nThe unsafe prompts of each dataset wrapped in framings written by the project "
            "(`mlpm_guard/toolkit/jailbreaks.py`); recall at each method's threshold (`plain` is the unwrapped prompt).\n\n")
    rows = [[f, *(_fmt(result["jailbreaks"][s]["recall"][f]) for s in stems)] for f in framings]
    text += "MLPM recall per dataset:\n\n" + _table(["framing", *(f"`{s}`" for s in stems)], rows)
    if len(methods) > 1:
        def mean(block: dict[str, Any], f: str) -> float:
            return float(np.mean([block["jailbreaks"][s]["recall"][f] for s in block["jailbreaks"]]))

        rows = [[f, *(_fmt(mean(b, f)) for b in methods.values())] for f in framings]
        text += "\nMean recall over datasets, per method:\n\n" + _table(["framing", *methods], rows)
    return text + "\n"


def _e2e_section(e2e: dict[str, Any]) -> str:
    systems = e2e["systems"]
    text = (f"## End to end (answers of at most {e2e['max_new_tokens']} tokens)\n\nA refusal is the guard's block or "
            "an answer that opens with a refusal phrase. ASR (attack success rate) is the share of unsafe prompts "
            "answered without a refusal; over-refusal is the refusal rate on safe prompts.\n\n")
    for name, s in systems.items():
        text += f"- **{name}**: {s['description'].split(': ', 1)[-1]}\n"
    cols = ("refusal_rate_unsafe", "attack_success_rate", "over_refusal", "blocked_by_guard", "refused_by_model")
    header = ["system", "n", "refusal (unsafe)", "ASR", "over-refusal", "blocked by guard", "refused by model", "routes"]

    def routes(stats: dict[str, Any]) -> str:
        return ", ".join(f"{r} {n}" for r, n in stats["routes"].items())

    rows = [[name, s["all"]["n"], *(_pct(s["all"][c]) for c in cols), routes(s["all"])] for name, s in systems.items()]
    text += "\nAll datasets:\n\n" + _table(header, rows)
    rows = [[f"`{stem}`", name, st["n"], *(_pct(st[c]) for c in cols), routes(st)]
            for stem in next(iter(systems.values()))["datasets"] for name, s in systems.items()
            for st in [s["datasets"][stem]]]
    text += "\nPer dataset:\n\n" + _table(["dataset", *header], rows)
    rows = [[name, route, st["n"], st["n_unsafe"], st["n_safe"], _pct(st["refusal_rate_unsafe"]),
             _pct(st["over_refusal"])]
            for name, s in systems.items() if len(s["all"]["per_route"]) > 1 or name == "guard"
            for route, st in s["all"]["per_route"].items()]
    if rows:
        text += "\nPer route (all datasets):\n\n" + _table(
            ["system", "route", "n", "unsafe", "safe", "refusal (unsafe)", "over-refusal"], rows)
    examples = [(name, ex) for name, s in systems.items() for ex in s.get("examples", [])]
    if examples:
        text += "\nSample answers:\n\n" + _table(
            ["system", "label", "route", "refused", "prompt", "answer"],
            [[name, ex["label"], ex["route"] or "–", "yes" if ex["refused"] else "no", _cell(ex["prompt"], 80),
              _cell(ex["answer"], 120)] for name, ex in examples])
    return text + "\n"


def _cell(text: str, n: int) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text[:n] + ("…" if len(text) > n else "")


def render_markdown(result: dict[str, Any], figures: Sequence[str] = ()) -> str:
    """The report as Markdown (tables for every section present in ``result``, then the figures)."""
    parts = ["# mlpm-guard evaluation report\n"]
    if "datasets" in result:
        layers = ", ".join(str(x) for x in result.get("layers", []))
        parts.append(f"Backbone `{result.get('backbone')}`, layers [{layers}].\n")
        parts.append(_moderation_section(result))
        parts.append(_baselines_section(result))
        parts.append(_target_section(result))
        parts.append(_jailbreak_section(result))
    if result.get("end_to_end"):
        parts.append(_e2e_section(result["end_to_end"]))
    if figures:
        parts.append("## Figures\n\n" + "\n".join(f"![{Path(f).stem}]({Path(f).name})\n" for f in figures))
    return "\n".join(p for p in parts if p)


# ---------------------------------------------------------------------------- plots
def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("plots need matplotlib: `pip install 'mlpm-guard[plots]'` (or pass plots=False / "
                          "--no-plots for a report with tables only)") from None
    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int, cols: int = 3) -> tuple[int, int]:
    cols = min(cols, max(n, 1))
    return math.ceil(n / cols), cols


def _score_histograms(plt: Any, result: dict[str, Any], path: Path) -> Path | None:
    scores, labels = result.get("_scores"), result.get("_labels")
    if not scores:
        return None
    rows, cols = _grid(len(scores))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    bins = np.linspace(0, 1, 26)
    for ax, stem in zip(axes.flat, scores):
        p, y = np.asarray(scores[stem]), np.asarray(labels[stem])
        for lab, colour, name in ((0, "#4caf50", "safe"), (1, "#e53935", "unsafe")):
            if (y == lab).any():
                ax.hist(p[y == lab], bins=bins, alpha=0.6, color=colour, label=f"{name} ({int((y == lab).sum())})")
        ax.axvline(result["threshold"], color="black", lw=1, label="threshold")
        if "target" in result:
            ax.axvline(result["target"]["threshold"], color="black", lw=1, ls="--", label="target threshold")
        ax.set_title(stem, fontsize=10)
        ax.set_xlabel("P(unsafe)")
        ax.set_xlim(0, 1)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(scores):]:
        ax.axis("off")
    fig.suptitle("MLPM score by true label")
    return _save(plt, fig, path)


def _roc_pr(plt: Any, result: dict[str, Any], path: Path) -> Path | None:
    methods = _methods(result)
    stems = [s for s, m in result["datasets"].items() if m.get("curves")]
    if not stems:
        return None
    fig, axes = plt.subplots(len(stems), 2, figsize=(9, 3.4 * len(stems)), squeeze=False)
    styles = ["-", "--", "-.", ":"]
    for (ax_roc, ax_pr), stem in zip(axes, stems):
        for k, (name, block) in enumerate(methods.items()):
            m = block["datasets"][stem]
            c = m["curves"]
            # MLPM drawn thick and on top, baselines dashed, so equal curves stay visible.
            style = {"lw": 2.4 if name == MLPM else 1.4, "ls": styles[k % len(styles)], "zorder": 3 if name == MLPM else 2}
            ax_roc.plot(c["roc"]["x"], c["roc"]["y"], label=f"{name} (AUROC {_fmt(m['auroc'])})", **style)
            ax_pr.plot(c["pr"]["x"], c["pr"]["y"], label=f"{name} (AP {_fmt(m['auprc'])})", **style)
        ax_roc.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        ax_roc.set(title=f"{stem}: ROC", xlabel="false positive rate (safe flagged)", ylabel="recall", xlim=(0, 1),
                   ylim=(0, 1.02))
        base = m["n_unsafe"] / m["n"]
        ax_pr.axhline(base, color="grey", lw=0.8, ls=":")
        ax_pr.set(title=f"{stem}: precision-recall", xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
        ax_roc.legend(fontsize=7, loc="lower right")
        ax_pr.legend(fontsize=7, loc="lower left")
    return _save(plt, fig, path)


def _reliability(plt: Any, result: dict[str, Any], path: Path) -> Path | None:
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for stem, m in result["datasets"].items():
        r = m["reliability"]
        ax.plot(r["mean_predicted"], r["fraction_unsafe"], marker="o", ms=3, label=f"{stem} (ECE {_fmt(m['ece'])})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set(title="MLPM reliability", xlabel="mean P(unsafe) in bin", ylabel="fraction unsafe in bin", xlim=(0, 1),
           ylim=(0, 1.02))
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _layer_weights(plt: Any, result: dict[str, Any], path: Path) -> Path | None:
    weights = result.get("layer_weights")
    if not weights:
        return None
    # One bar series per prototype set and pooling; a reading's key is "16" or "mean 16".
    series: dict[str, dict[int, float]] = {}
    for set_name, w in weights.items():
        for key, value in w.items():
            pooling, _, layer = key.rpartition(" ")
            name = f"{set_name} ({pooling})" if pooling else set_name
            series.setdefault(name, {})[int(layer)] = value
    n_layers = result.get("num_layers") or max(layer for w in series.values() for layer in w)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * n_layers + 2), 3.5))
    width = 0.8 / len(series)
    for k, (name, w) in enumerate(series.items()):
        xs = np.array(list(w)) + (k - (len(series) - 1) / 2) * width
        ax.bar(xs, list(w.values()), width, label=name)
    ax.set_xticks(range(1, n_layers + 1), [str(i) for i in range(1, n_layers + 1)], fontsize=7)
    ax.set_xlim(0.4, n_layers + 0.6)
    ax.axhline(0, color="black", lw=0.6)
    ax.set(title="Layer combination: weight of each layer's P(unsafe) (no bar: dropped by the L1 penalty)",
           xlabel="layer", ylabel="weight")
    ax.title.set_fontsize(9)
    if len(series) > 1:
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _routes(plt: Any, e2e: dict[str, Any], path: Path) -> Path | None:
    systems = e2e["systems"]
    fig, (ax_r, ax_f) = plt.subplots(1, 2, figsize=(12, 0.5 * len(systems) + 3))
    names = list(systems)
    # Route shares per system (all datasets), stacked.
    left = np.zeros(len(names))
    for route, colour in _ROUTE_COLOURS.items():
        share = np.array([systems[n]["all"]["routes"].get(route, 0) / max(systems[n]["all"]["n"], 1) for n in names])
        if share.any():
            ax_r.barh(names, share, left=left, color=colour, label=route)
            left += share
    ax_r.set(title="Routes taken (all prompts)", xlabel="share of prompts", xlim=(0, 1))
    ax_r.invert_yaxis()
    ax_r.legend(fontsize=7, loc="lower right")
    y = np.arange(len(names))
    for k, (key, colour, label) in enumerate((("refusal_rate_unsafe", "#e53935", "refusal rate, unsafe prompts"),
                                              ("over_refusal", "#4caf50", "refusal rate, safe prompts"))):
        vals = [systems[n]["all"][key] if systems[n]["all"][key] is not None else 0.0 for n in names]
        ax_f.barh(y + (k - 0.5) * 0.38, vals, height=0.38, color=colour, label=label)
    ax_f.set_yticks(y, names)
    ax_f.invert_yaxis()
    ax_f.set(title="Refusals", xlabel="share of prompts", xlim=(0, 1))
    ax_f.legend(fontsize=7, loc="lower right")
    return _save(plt, fig, path)


def _jailbreaks(plt: Any, result: dict[str, Any], path: Path) -> Path | None:
    methods = {k: v for k, v in _methods(result).items() if v.get("jailbreaks")}
    if not methods:
        return None
    framings = list(next(iter(result["jailbreaks"].values()))["recall"])
    fig, ax = plt.subplots(figsize=(min(12.0, 2 + 0.3 * len(framings) * (len(methods) + 1)), 4))
    width = 0.8 / len(methods)
    x = np.arange(len(framings))
    for k, (name, block) in enumerate(methods.items()):
        vals = [np.mean([block["jailbreaks"][s]["recall"][f] for s in block["jailbreaks"]]) for f in framings]
        ax.bar(x + (k - (len(methods) - 1) / 2) * width, vals, width, label=name)
    ax.set_xticks(x, framings, rotation=30, ha="right", fontsize=8)
    ax.set(title="Recall on unsafe prompts per jailbreak framing (mean over datasets)", ylabel="recall", ylim=(0, 1.05))
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(result: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write the PNG plots that ``result`` has data for; returns their paths.

    Raises:
        ConfigError: when matplotlib is not installed.
    """
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    made: list[Path | None] = []
    if "datasets" in result:
        made += [_score_histograms(plt, result, out / "score_histograms.png"), _roc_pr(plt, result, out / "roc_pr.png"),
                 _reliability(plt, result, out / "reliability.png"),
                 _layer_weights(plt, result, out / "layer_weights.png"), _jailbreaks(plt, result, out / "jailbreaks.png")]
    if result.get("end_to_end"):
        made.append(_routes(plt, result["end_to_end"], out / "routes.png"))
    return [p for p in made if p is not None]


def write_report(result: dict[str, Any], out_dir: str | Path, *, plots: bool | None = None) -> Path:
    """Write ``report.md`` (and the PNG plots) into ``out_dir``; returns the report's path.

    Args:
        plots: ``True`` requires matplotlib, ``False`` writes tables only, ``None`` plots when
            matplotlib is installed and says so in the log when it is not.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures: list[Path] = []
    if plots is not False:
        try:
            figures = write_plots(result, out)
        except ConfigError:
            if plots:
                raise
            logger.warning("matplotlib is not installed: report.md has tables only (`pip install 'mlpm-guard[plots]'`)")
    path = out / "report.md"
    atomic_write_text(path, render_markdown(result, [f.name for f in figures]))
    return path
