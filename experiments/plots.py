"""Figures of the privacy-utility study (matplotlib, Agg backend: no display needed)."""

import math
import textwrap
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib import ticker  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

MODE_STYLE = {"central": {"color": "tab:blue", "marker": "o", "label": "central DP"},
              "central_tree": {"color": "tab:purple", "marker": "D", "label": "DP-FTRL"},
              "local": {"color": "tab:red", "marker": "s", "label": "local DP"},
              "none": {"color": "0.3", "marker": None, "label": "no DP"},
              "example": {"color": "tab:green", "marker": "^", "label": "example-level DP"}}
# Lines of the frontier figure, several per mode (one per recipe row).
_ROW_COLORS = ("tab:green", "tab:olive", "tab:blue", "tab:cyan", "tab:red", "tab:purple",
               "tab:brown", "tab:pink")


def _finite(values) -> list:
  return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _mean_std(values) -> tuple[float, float]:
  v = _finite(values)
  if not v:
    return float("nan"), float("nan")
  return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def plot_privacy_utility(groups: Sequence[dict], path: str, title: str = "") -> None:
  """Test AUC, membership-inference AUC and, if the runs have it, the canary
  audit's empirical epsilon, each against the theoretical epsilon.

  `groups` are the study's per-(mode, level) aggregates (see
  `report.aggregate`): each has "mode", "level", "values" (a dict of
  lists over seeds: epsilon, test_auc, mia_auc, empirical_epsilon) and "label"
  (e.g. "z=1.1"). Epsilon is on a log axis; error bars are the std over
  seeds; the non-private baseline is a horizontal line (mean) with a band
  (std). On the empirical panel the diagonal is the accountant's bound.
  """
  panels = [("test_auc", "test AUC"), ("mia_auc", "membership-inference AUC (best attack)")]
  if any(_finite(g["values"].get("empirical_epsilon", [])) for g in groups):
    panels.append(("empirical_epsilon", "empirical ε (canary audit, mean ± sd)"))
  fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.8))
  for ax, (metric, ylabel) in zip(axes, panels):
    baseline = [g for g in groups if g["mode"] == "none"]
    if baseline:
      m, s = _mean_std(baseline[0]["values"][metric])
      if math.isfinite(m):
        ax.axhline(m, color=MODE_STYLE["none"]["color"], linestyle="--",
                   label=f"no DP (ε = ∞): {m:.3g}" if metric == "empirical_epsilon" else
                   f"no DP (ε = ∞): {m:.3f}")
        ax.axhspan(m - s, m + s, color=MODE_STYLE["none"]["color"], alpha=0.15, linewidth=0)
    any_points = False
    for mode in ("central", "local"):
      pts = []
      for g in groups:
        if g["mode"] != mode:
          continue
        ex, exs = _mean_std(g["values"]["epsilon"])
        y, ys = _mean_std(g["values"][metric])
        if math.isfinite(ex) and ex > 0 and math.isfinite(y):
          pts.append((ex, exs, y, ys, g["label"]))
      if not pts:
        continue
      any_points = True
      pts.sort()
      style = MODE_STYLE[mode]
      ax.errorbar([p[0] for p in pts], [p[2] for p in pts], yerr=[p[3] for p in pts],
                  xerr=[p[1] for p in pts], color=style["color"], marker=style["marker"],
                  capsize=3, label=style["label"])
      for ex, _, y, _, label in pts:
        ax.annotate(label, (ex, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                    color=style["color"])
    if metric == "mia_auc":
      ax.axhline(0.5, color="0.6", linestyle=":", linewidth=1, label="chance (0.5)")
    if metric == "empirical_epsilon":
      theory = [e for g in groups if g["mode"] != "none" for e in _finite(g["values"]["epsilon"])]
      if theory:
        ends = [min(theory) / 2, max(theory) * 2]
        ax.plot(ends, ends, color="0.4", linestyle=":", label="theoretical bound (ε_emp = ε)")
      ax.set_yscale("symlog", linthresh=0.1)
      ax.set_ylim(bottom=0)
    if any_points:
      ax.set_xscale("log")
      _plain_log_ticks(ax)
    ax.set_xlabel("ε (client-level, at the run's δ; log scale)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  if title:
    fig.suptitle(textwrap.fill(title, 140), fontsize=9)
  _save(fig, path)


def plot_frontier(series: Sequence[dict], path: str, title: str = "") -> None:
  """Test AUC against calibrated epsilon (log axis), one line per recipe row.

  Each of `series` has "label", "mode", "points" (a list of (epsilon,
  [test AUC per run]), epsilon being the largest over the runs) and
  "baseline" (test AUCs of the same recipe at z = 0, or None): drawn as a
  dashed line at its mean with a ±sd band in the row's colour. Error bars are
  the sd over runs.
  """
  fig, ax = plt.subplots(figsize=(8, 7))
  for i, row in enumerate(series):
    color = _ROW_COLORS[i % len(_ROW_COLORS)]
    marker = MODE_STYLE.get(row["mode"], {}).get("marker") or "o"
    pts = [(eps, *_mean_std(aucs)) for eps, aucs in row["points"] if _finite(aucs)]
    if pts:
      ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                  color=color, marker=marker, capsize=3, label=row["label"])
    if row.get("baseline"):
      m, s = _mean_std(row["baseline"])
      if math.isfinite(m):
        ax.axhline(m, color=color, linestyle="--", linewidth=1,
                   label=f"{row['label']}, no noise: {m:.3f}")
        ax.axhspan(m - s, m + s, color=color, alpha=0.12, linewidth=0)
  ax.axhline(0.5, color="0.6", linestyle=":", linewidth=1, label="chance (0.5)")
  ax.set_xscale("log")
  _plain_log_ticks(ax)
  ax.set_xlabel("ε at the run's δ (each row's own privacy unit; log scale)")
  ax.set_ylabel("test AUC (best-val round)")
  ax.grid(True, which="both", alpha=0.3)
  # Below the axes: with one line per row, inside it covered the data.
  ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
  if title:
    ax.set_title(textwrap.fill(title, 90), fontsize=9)
  _save(fig, path)


def _save(fig, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _plain_log_ticks(ax) -> None:
  """Log-axis labels as plain numbers (5, 20, 300), minor ones only on a short axis."""
  plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
  ax.xaxis.set_major_formatter(plain)
  lo, hi = ax.get_xlim()
  short = lo > 0 and hi / lo < 30
  ax.xaxis.set_minor_formatter(plain if short else ticker.NullFormatter())
  ax.tick_params(axis="x", which="minor", labelsize=7)


def plot_training_curves(curves: dict, path: str, title: str = "") -> None:
  """Val AUC per round, mean over seeds with a std band, one line per mode.

  `curves` maps a label (e.g. "central DP, z=1.1") to a mode and a list of
  per-seed curves: {"mode": str, "runs": [{round: val_auc}, ...]}.
  """
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for label, curve in curves.items():
    runs = [r for r in curve["runs"] if r]
    if not runs:
      continue
    rounds = sorted(set().union(*[set(r) for r in runs]))
    means, stds = [], []
    for rnd in rounds:
      m, s = _mean_std([r.get(rnd) for r in runs])
      means.append(m)
      stds.append(s)
    means, stds = np.asarray(means), np.asarray(stds)
    style = MODE_STYLE.get(curve["mode"], {})
    ax.plot(rounds, means, color=style.get("color"), marker=style.get("marker"), markersize=3,
            label=f"{label} (n={len(runs)})")
    ax.fill_between(rounds, means - stds, means + stds, color=style.get("color"), alpha=0.15,
                    linewidth=0)
  ax.set_xlabel("round")
  ax.set_ylabel("val AUC (mean over seeds, band = std)")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  if title:
    ax.set_title(textwrap.fill(title, 90), fontsize=9)
  _save(fig, path)


def plot_canary_audit(series: Sequence[dict], path: str, title: str = "") -> None:
  """The canary audits' empirical epsilon against the theoretical epsilon (log-log).

  Each of `series` has "label", "points" (dicts with "theoretical", "estimate"
  and "ci" = [low, high]; a lower bound is [bound, inf], drawn as a triangle) and
  "reference" (the estimates of the same recipe without noise, drawn as a
  dashed line: there is no bound to draw them at). The diagonal is the
  accountant's bound: an interval entirely above it is a violation.
  """
  fig, ax = plt.subplots(figsize=(7, 7))
  span = []
  for i, row in enumerate(series):
    color = ("tab:blue", "tab:red", "tab:green")[i % 3]
    finite = [p for p in row["points"]
              if all(map(math.isfinite, (p["theoretical"], p["estimate"])))]
    shift = 1 + 0.06 * (i - (len(series) - 1) / 2)  # Side by side at the same epsilon.
    for j, p in enumerate(finite):
      low, high = p["ci"]
      x = p["theoretical"] * shift
      label = row["label"] if j == 0 else None
      if not math.isfinite(high) and low == p["estimate"]:
        ax.plot([x], [p["estimate"]], color=color, marker="^", linestyle="none", alpha=0.8,
                label=label)  # A lower bound: no upper end to draw.
      else:
        top = high if math.isfinite(high) else 10 * max(p["estimate"], 0.1)
        ax.errorbar([x], [p["estimate"]], yerr=[[p["estimate"] - low], [top - p["estimate"]]],
                    capsize=3, color=color, marker="o", alpha=0.8, label=label)
      span.append(p["theoretical"])
    ref = _finite(row.get("reference") or [])
    if ref:
      ax.axhline(float(np.mean(ref)), color=color, linestyle="--",
                 label=f"{row['label']}, no noise: {np.mean(ref):.3g}")
  if span:
    ends = [min(span) / 2, max(span) * 2]
    ax.plot(ends, ends, color="0.4", linestyle=":", label="theoretical bound (ε_emp = ε)")
  ax.set_xscale("log")
  _plain_log_ticks(ax)
  ax.set_yscale("symlog", linthresh=0.1)
  ax.set_ylim(bottom=0)
  ax.set_xlabel("theoretical ε at the run's δ (each row's privacy unit)")
  ax.set_ylabel("empirical ε (estimate with 95% CI, or ▲ 95% lower bound)")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13))
  if title:
    ax.set_title(textwrap.fill(title, 70), fontsize=9)
  _save(fig, path)
