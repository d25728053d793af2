"""Bond-spectrum figure (`inspect --plot`): matplotlib is optional, imported lazily, and drawn
with the Agg canvas (no pyplot, no global backend change).

Layout that stays readable for many modules: one row per module type (the name with its layer
numbers replaced by `*`, e.g. `attention.self.query`), one column per inner bond; in each
panel every layer of that type is one curve (colour = layer), the normalized singular values
s_i / ||W||_F on a log axis against i = 1..r. A dot marks each kept bond dim r; where r is
below the lossless bond dim a dashed line shows the cut and the x axis runs to the lossless dim.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mposurgeon.errors import MposurgeonError

MAX_ROWS = 12  # module types drawn; more are listed as left out in the title
_LAYER = re.compile(r"\.(\d+)(?=\.)")


@dataclass
class ModuleSpectra:
    """One MPO module: its name, the kept singular values of each inner bond divided by
    ||W||_F (descending; length = kept bond dim), and its lossless inner bond dims."""

    name: str
    spectra: list[list[float]]
    full_bonds: list[int]


def require_matplotlib() -> Any:
    """The matplotlib module, or a clear error with the install hint."""
    try:
        import matplotlib
    except ImportError:
        raise MposurgeonError(
            "--plot needs matplotlib, which is not installed",
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
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


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
