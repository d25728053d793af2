"""The figures of `inspect --plot`: bond spectra of an artifact's MPO modules, or the training
curves of a trained one. matplotlib is optional, imported lazily, and drawn with the Agg canvas
(no pyplot, no global backend change).

Bond spectra, a layout that stays readable for many modules: one row per module type (the name
with its layer numbers replaced by `*`, e.g. `attention.self.query`), one column per inner bond;
in each panel every layer of that type is one curve (colour = layer), the normalized singular
values s_i / ||W||_F on a log axis against i = 1..r. A dot marks each kept bond dim r; where r
is below the lossless bond dim a dashed line shows the cut and the x axis runs to the lossless
dim.

Training curves, from a train manifest's `metrics`: the training loss per step (and the eval
loss as markers) in the first panel; the eval metrics per evaluation in the others, the
[0, 1]-scale ones (accuracy, F1, correlations, ...) together, any other one (perplexity, mse,
...) in a panel of its own. A dashed vertical line marks `best_step` when the run kept the
weights of its best evaluation.

Sweeps, from a recipe's swept stages: a metric against trainable parameters (log x axis), one
line per swept stage, each point the mean over the seeds of one setting, with error bars (and,
on a line of several points, a shaded band) from the seeds' min to their max.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mposurgeon.errors import MposurgeonError, UsageError

MAX_ROWS = 12  # module types drawn; more are listed as left out in the title
_LAYER = re.compile(r"\.(\d+)(?=\.)")


@dataclass
class ModuleSpectra:
    """One MPO module: its name, the kept singular values of each inner bond divided by
    ||W||_F (descending; length = kept bond dim), and its lossless inner bond dims."""

    name: str
    spectra: list[list[float]]
    full_bonds: list[int]


def require_matplotlib(what: str = "--plot") -> Any:
    """The matplotlib module, or a clear error (`what` needs it) with the install hint."""
    try:
        import matplotlib
    except ImportError:
        raise MposurgeonError(
            f"{what} needs matplotlib, which is not installed",
            hint='pip install "mposurgeon[plot]"',
        ) from None
    return matplotlib


def module_type(name: str) -> tuple[str, int | None]:
    """('encoder.layer.*.attention.self.query', 0) for 'encoder.layer.0.attention.self.query'."""
    match = _LAYER.search(name)
    return _LAYER.sub(".*", name), int(match.group(1)) if match else None


def plot_spectra(modules: Sequence[ModuleSpectra], path: str | Path, title: str = "") -> Path:
    """Draw the bond spectra of `modules` into the PNG `path` (parents created); return it."""
    require_matplotlib()
    # A bare Figure renders with the Agg canvas: no pyplot, no global backend switched.
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator, NullFormatter

    groups: dict[str, list[tuple[int | None, ModuleSpectra]]] = {}
    for module in modules:
        kind, layer = module_type(module.name)
        groups.setdefault(kind, []).append((layer, module))
    kinds = list(groups)[:MAX_ROWS]
    layered = [k for k in kinds if "*" in k]
    prefix = _common_prefix(layered) if len(layered) > 1 else ""
    prefix = prefix if all(k.startswith(prefix) for k in kinds) else ""
    cols = max((len(m.spectra) for m in modules), default=1) or 1
    layers = [layer for group in groups.values() for layer, _ in group if layer is not None]
    low, high = min(layers, default=0), max(layers, default=0)
    norm, cmap = Normalize(low, max(high, low + 1)), colormaps["viridis"]
    # one y range for every panel (s / ||W|| <= 1), so that bonds and modules compare at a glance
    positive = [v for m in modules for s in m.spectra for v in s if v > 0]
    y_low = max(min(positive, default=1e-3), 1e-8) / 1.5

    fig = Figure(figsize=(2.8 * cols + 1.4, 1.9 * len(kinds) + 1.0))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(kinds), cols, squeeze=False)
    for row, kind in enumerate(kinds):
        for col in range(cols):
            ax = axes[row][col]
            drawn = False
            for layer, module in groups[kind]:
                if col < len(module.spectra):
                    colour = cmap(norm(layer if layer is not None else low))
                    drawn |= _draw_bond(ax, module.spectra[col], module.full_bonds[col], colour)
            if not drawn:
                ax.axis("off")
                continue
            ax.set_yscale("log")
            ax.set_ylim(y_low, 1.2)
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
            ax.tick_params(labelsize=7)
            ax.grid(True, which="major", alpha=0.3)
            if row == 0:
                ax.set_title(f"bond {col + 1}", fontsize=9)
            if col == 0:
                ax.set_ylabel(_wrap(kind[len(prefix) :]), fontsize=8)
            if row == len(kinds) - 1:
                ax.set_xlabel("singular value index", fontsize=8)
    head = f"{title}: " if title else ""
    head += f"bond spectra s / ||W||_F of {len(modules)} MPO modules"
    if prefix:
        head += f"; row label: {prefix}<label>"
    if len(groups) > len(kinds):
        head += f", first {len(kinds)} of {len(groups)} module types"
    fig.suptitle(
        head + "\ndot: kept bond dim; dashed line: cut below the lossless dim", fontsize=10
    )
    fig.tight_layout(rect=(0, 0, 0.92 if layers else 1, 1))
    if layers:
        cax = fig.add_axes((0.935, 0.15, 0.012, 0.7))
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax)
        bar.locator = MaxNLocator(integer=True)
        bar.update_ticks()
        bar.set_label("layer", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    return _save(fig, path)


def _draw_bond(ax: Any, values: list[float], full: int, colour: Any) -> bool:
    """One curve: the positive singular values, a dot at the kept dim, a dashed cut line."""
    points = [(i + 1, v) for i, v in enumerate(values) if v > 0]
    if not points:
        return False
    xs, ys = zip(*points, strict=True)
    ax.plot(xs, ys, color=colour, linewidth=1.0, alpha=0.9)
    ax.plot([xs[-1]], [ys[-1]], "o", color=colour, markersize=3)
    kept = len(values)
    if kept < full:
        ax.axvline(kept, color=colour, linestyle="--", linewidth=0.7, alpha=0.7)
    ax.set_xlim(0, max(full, kept) + 1)
    return True


def _common_prefix(kinds: list[str]) -> str:
    """The longest common dotted prefix of the module types ('encoder.layer.*.')."""
    parts = [k.split(".") for k in kinds]
    common: list[str] = []
    for pieces in zip(*parts, strict=False):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    if len(common) >= min(len(p) for p in parts):
        common = common[:-1]
    return ".".join(common) + "." if common else ""


def _wrap(label: str, width: int = 26) -> str:
    """A dotted module name broken into lines of about `width` characters at the dots."""
    lines: list[str] = []
    for piece in label.split("."):
        if lines and len(lines[-1]) + len(piece) + 1 <= width:
            lines[-1] += "." + piece
        else:
            lines.append(piece if not lines else "." + piece)
    return "\n".join(lines)


def _save(fig: Any, path: str | Path) -> Path:
    """Write `fig` as a PNG into `path` (parents created, replaced atomically); return it."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


# -- training curves -------------------------------------------------------------------------

#: Keys of an evaluation that place or count it rather than measure the model: never drawn.
NOT_METRICS = frozenset(
    {"step", "epoch", "rows", "tokens", "generated_rows", "examples", "samples"}
)
#: Eval metrics on a [0, 1] scale ([-1, 1] for correlations), drawn together in one panel.
BOUNDED_METRICS = frozenset(
    {
        "accuracy",
        "balanced_accuracy",
        "macro_f1",
        "micro_f1",
        "weighted_f1",
        "f1",
        "precision",
        "recall",
        "mcc",
        "pearson",
        "spearman",
        "exact_match",
        "token_accuracy",
    }
)
MAX_COLUMNS = 3  # panels in a row of the training-curves figure
TRAIN_LOSS_LABEL, EVAL_LOSS_LABEL = "training loss", "eval loss"


@dataclass(frozen=True)
class Series:
    """One curve: its label and its points (steps[i], values[i]) in the manifest's order; a
    point whose step is not an int or whose value is missing or not finite is left out."""

    label: str
    steps: list[int]
    values: list[float]


@dataclass(frozen=True)
class TrainingCurves:
    """What `plot_curves` draws. loss: the training loss at each logged step (the mean of the
    steps since the previous point); eval_loss: the eval loss per evaluation (None: no eval
    loss); panels: the eval-metric panels, the [0, 1]-scale metrics together first, then one
    per other metric (perplexity, mse, ...); best_step: the step whose weights were kept."""

    loss: Series
    eval_loss: Series | None = None
    panels: list[list[Series]] = field(default_factory=list)
    best_step: int | None = None


def training_curves(metrics: Mapping[str, Any]) -> TrainingCurves:
    """The curves in a train manifest's `metrics`: `loss_history` ({step, loss} per point),
    `eval` ({step, <metric>: value, ...} per evaluation; counts such as rows are not drawn)
    and `best_step` (optional). A UsageError when there is no training loss (0 steps)."""
    loss = _series(TRAIN_LOSS_LABEL, metrics.get("loss_history"), "loss")
    if not loss.steps:
        steps = metrics.get("steps")
        raise UsageError(
            "no training curves to plot: the artifact's metrics record no training loss"
            + (f" (it trained {steps} steps)" if isinstance(steps, int) else ""),
            hint="train for at least one step (--max-steps)",
        )
    evals = metrics.get("eval")
    rows = [row for row in evals if isinstance(row, Mapping)] if isinstance(evals, list) else []
    names = dict.fromkeys(
        key
        for row in rows
        for key, value in row.items()
        if isinstance(key, str) and key not in NOT_METRICS and _finite(value)
    )
    eval_loss = _series(EVAL_LOSS_LABEL, rows, "loss") if "loss" in names else None
    series = [_series(name, rows, name) for name in names if name != "loss"]
    bounded = [s for s in series if s.label in BOUNDED_METRICS]
    others = [[s] for s in series if s.label not in BOUNDED_METRICS]
    best = metrics.get("best_step")
    return TrainingCurves(
        loss=loss,
        eval_loss=eval_loss,
        panels=([bounded] if bounded else []) + others,
        best_step=best if isinstance(best, int) and not isinstance(best, bool) else None,
    )


def curves_figure(curves: TrainingCurves, title: str = "") -> Any:
    """The matplotlib Figure (on an Agg canvas) of `curves`: the loss panel, then one panel per
    entry of `curves.panels`, at most MAX_COLUMNS a row; x is the optimizer step in all."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    count = 1 + len(curves.panels)
    cols = min(count, MAX_COLUMNS)
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(4.6 * cols, 3.4 * rows + 0.5))
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in axes[count:]:
        ax.axis("off")

    every = [curves.loss, *([curves.eval_loss] if curves.eval_loss else [])]
    every += [s for panel in curves.panels for s in panel]
    steps = [x for s in every for x in s.steps]
    steps += [curves.best_step] if curves.best_step is not None else []
    low, high = min(steps), max(steps)
    pad = max(0.5, 0.03 * (high - low))

    loss_ax = axes[0]
    many = len(curves.loss.steps) > 50
    loss_ax.plot(
        curves.loss.steps,
        curves.loss.values,
        "-" if many else ".-",
        linewidth=1.0,
        label=curves.loss.label,
    )
    if curves.eval_loss is not None:
        loss_ax.plot(
            curves.eval_loss.steps,
            curves.eval_loss.values,
            "o:",
            linewidth=0.8,
            markersize=4,
            label=curves.eval_loss.label,
        )
    loss_ax.set_title("loss", fontsize=10)
    eval_losses = curves.eval_loss.values if curves.eval_loss is not None else []
    _log_if_wide(loss_ax, curves.loss.values + eval_losses)
    for ax, panel in zip(axes[1:count], curves.panels, strict=True):
        for s in panel:
            ax.plot(s.steps, s.values, "o-", linewidth=1.0, markersize=4, label=s.label)
        if len(panel) == 1:
            ax.set_title(f"eval {panel[0].label}", fontsize=10)
            _log_if_wide(ax, panel[0].values)
        else:
            ax.set_title("eval metrics", fontsize=10)
    for i, ax in enumerate(axes[:count]):
        if curves.best_step is not None:
            ax.axvline(
                curves.best_step,
                color="0.35",
                linestyle="--",
                linewidth=1.0,
                label=f"best step {curves.best_step}" if i == 0 else None,
            )
        ax.set_xlim(low - pad, high + pad)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(which="both", labelsize=7)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95 if title else 1))
    return fig


def plot_curves(curves: TrainingCurves, path: str | Path, title: str = "") -> Path:
    """Draw `curves` (see `curves_figure`) into the PNG `path` (parents created); return it."""
    return _save(curves_figure(curves, title), path)


def _finite(value: Any) -> bool:
    """A real number (not a bool) that is finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _series(label: str, rows: Any, key: str) -> Series:
    """The (step, row[key]) points of the JSON objects `rows` whose step and value are usable."""
    points = [
        (row["step"], float(row[key]))
        for row in (rows if isinstance(rows, list) else [])
        if isinstance(row, Mapping)
        and isinstance(row.get("step"), int)
        and not isinstance(row.get("step"), bool)
        and _finite(row.get(key))
    ]
    return Series(label, [step for step, _ in points], [value for _, value in points])


def _log_if_wide(ax: Any, values: list[float]) -> None:
    """A log y axis when every value is positive and they span more than a factor of 10."""
    if values and min(values) > 0 and max(values) > 10 * min(values):
        from matplotlib.ticker import FormatStrFormatter, LogLocator

        ax.set_yscale("log")
        ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))  # labels 0.2 0.5 1 2 5 ...
        for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis_formatter(FormatStrFormatter("%g"))  # 0.5, not 5 x 10^-1


# -- sweeps ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepSample:
    """One finished sweep point: its line (the stage), its setting (the swept values other
    than the seeds, as text: the points the mean is over share it), x = its trainable
    parameters and y = its metric."""

    line: str
    setting: str
    x: float
    y: float


@dataclass(frozen=True)
class SweepLine:
    """One line of the sweep plot: at each x (ascending), the mean, min and max of the metric
    over `count` points (the seeds of one setting)."""

    label: str
    x: list[float]
    mean: list[float]
    low: list[float]
    high: list[float]
    count: list[int]


def sweep_lines(samples: Iterable[SweepSample]) -> list[SweepLine]:
    """The samples grouped into lines (in order of first appearance) and, within a line, into
    (setting, x) groups: mean, min and max of y per group, sorted by x."""
    groups: dict[str, dict[tuple[str, float], list[float]]] = {}
    for sample in samples:
        groups.setdefault(sample.line, {}).setdefault((sample.setting, sample.x), []).append(
            sample.y
        )
    lines = []
    for label, points in groups.items():
        order = sorted(points, key=lambda key: key[1])  # stable: equal x keep their order
        ys = [points[key] for key in order]
        lines.append(
            SweepLine(
                label=label,
                x=[x for _, x in order],
                mean=[sum(y) / len(y) for y in ys],
                low=[min(y) for y in ys],
                high=[max(y) for y in ys],
                count=[len(y) for y in ys],
            )
        )
    return lines


def sweep_figure(lines: Sequence[SweepLine], *, metric: str, title: str = "") -> Any:
    """The matplotlib Figure (on an Agg canvas) of a sweep: `metric` against trainable
    parameters on a log x axis, a line per entry of `lines` at the means, error bars (and a
    band on a line of several points) from min to max."""
    require_matplotlib("the sweep plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig = Figure(figsize=(7.0, 4.6))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for line in lines:
        seeds = sorted(set(line.count))
        many = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
        label = line.label if seeds == [1] else f"{line.label} (mean of {many} seeds)"
        below = [m - lo for m, lo in zip(line.mean, line.low, strict=True)]
        above = [hi - m for m, hi in zip(line.mean, line.high, strict=True)]
        drawn = ax.errorbar(
            line.x,
            line.mean,
            yerr=[below, above],
            fmt="o-",
            linewidth=1.2,
            markersize=4,
            capsize=3,
            label=label,
        )
        if len(line.x) > 1 and max(line.count) > 1:
            colour = drawn.lines[0].get_color()
            ax.fill_between(line.x, line.low, line.high, color=colour, alpha=0.15, linewidth=0)
    ax.set_xscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:,.0f}")  # 1,000 rather than 10^3
    ax.xaxis.set_major_formatter(plain)
    xs = [x for line in lines for x in line.x]
    narrow = bool(xs) and max(xs) < 30 * min(xs)  # few decade ticks: label the minor ones too
    ax.xaxis.set_minor_formatter(plain if narrow else NullFormatter())
    ax.set_xlabel("trainable parameters (without the task head)", fontsize=9)
    name = metric.removeprefix("eval_").replace("_", " ")
    ax.set_ylabel(f"eval {name}" if metric.startswith("eval_") else name, fontsize=9)
    ax.tick_params(which="both", labelsize=8)
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", alpha=0.1)
    if lines:
        ax.legend(fontsize=8)
    head = title or f"{metric} against trainable parameters"
    fig.suptitle(f"{head}\nbars: min..max over seeds", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return fig


def plot_sweep(
    lines: Sequence[SweepLine], path: str | Path, *, metric: str, title: str = ""
) -> Path:
    """Draw the sweep (see `sweep_figure`) into the PNG `path` (parents created); return it."""
    return _save(sweep_figure(lines, metric=metric, title=title), path)
