"""`inspect --plot`: a PNG of the bond spectra, and a clear error without matplotlib."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest

import mposurgeon
from mposurgeon.errors import MposurgeonError
from mposurgeon.plot import ModuleSpectra, module_type, plot_spectra
from tests.cli_runner import run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def tiny_art(tiny_model_dir, tmp_path: Path, capsys) -> Path:
    out = tmp_path / "art"
    result = run_cli(capsys, "decompose", tiny_model_dir("bert"), "-o", out, "-n", "3", "-q")
    assert result.code == 0, result
    return out


def test_inspect_plot_writes_a_png(tiny_art: Path, tmp_path: Path, capsys) -> None:
    cut = tmp_path / "cut"
    assert run_cli(capsys, "truncate", tiny_art, "-o", cut, "--max-bond", "6", "-q").code == 0
    png = tmp_path / "figs" / "spectra.png"
    result = run_cli(capsys, "inspect", cut, "--plot", png)
    assert result.code == 0, result
    assert f"bond spectra plotted to {png}" in result.out
    data = png.read_bytes()
    assert len(data) > 10_000 and data.startswith(PNG_MAGIC)
    report = json.loads(run_cli(capsys, "inspect", tiny_art, "--json", "--plot", png).out)
    assert report["plot"] == str(png) and png.read_bytes() != data  # redrawn for the other input


def test_plot_without_mpo_modules_is_a_usage_error(tiny_model_dir, tmp_path, capsys) -> None:
    png = tmp_path / "s.png"
    result = run_cli(capsys, "inspect", tiny_model_dir("bert"), "--plot", png)
    assert result.code == 2 and "no MPO modules" in result.err
    assert not png.exists()


def test_missing_matplotlib_gives_the_install_hint(tiny_art: Path, tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name: str, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    png = tmp_path / "s.png"
    result = run_cli(capsys, "inspect", tiny_art, "--plot", png)
    assert result.code == 1, result
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1 and 'pip install "mposurgeon[plot]"' in lines[0], result.err
    assert not png.exists()
    with pytest.raises(MposurgeonError, match="matplotlib"):
        mposurgeon.inspect(tiny_art, plot=png)


def test_many_modules_stay_one_row_per_module_type(tmp_path: Path) -> None:
    assert module_type("encoder.layer.11.attention.self.query") == (
        "encoder.layer.*.attention.self.query",
        11,
    )
    assert module_type("lm_head") == ("lm_head", None)
    modules = [
        ModuleSpectra(
            name=f"decoder.block.{layer}.layer.{sub}.{kind}",
            spectra=[[1.0 / (i + 1) for i in range(r)] for r in (4, 30, 8)],
            full_bonds=[4, 40, 8],
        )
        for layer in range(24)
        for sub, kind in [(0, "SelfAttention.q"), (1, "DenseReluDense.wi"), (0, "zero")]
    ]
    modules.append(ModuleSpectra("lm_head", [[0.0, 0.0]], [2]))  # nothing positive to draw
    png = plot_spectra(modules, tmp_path / "many.png", title="t5-like")
    assert png.read_bytes().startswith(PNG_MAGIC)
