"""Typer option types shared by the commands (one definition per flag)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Output = Annotated[
    Path | None,
    typer.Option(
        "--output", "-o", help="Output directory (default: WORKDIR/MODEL/vN-STAGE, a new version)."
    ),
]
Workdir = Annotated[
    Path | None,
    typer.Option(
        "--workdir",
        "-w",
        help="Root of versioned outputs (default: $MPOSURGEON_WORKDIR or ./mposurgeon-out).",
    ),
]
Overwrite = Annotated[
    bool, typer.Option("--overwrite", help="Replace an existing non-empty output directory.")
]
Revision = Annotated[
    str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit).")
]
Offline = Annotated[
    bool | None,
    typer.Option(
        "--offline/--online", help="Use only the local HF cache (default: $HF_HUB_OFFLINE)."
    ),
]
CacheDir = Annotated[Path | None, typer.Option("--cache-dir", help="Hugging Face cache directory.")]
NoVerify = Annotated[
    bool, typer.Option("--no-verify", help="Skip checking the input artifact's checksums.")
]
MaxShardSize = Annotated[
    str, typer.Option("--max-shard-size", help="Largest safetensors shard, e.g. 5GB or 500MB.")
]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


def stage_kwargs(
    output: Path | None,
    workdir: Path | None,
    overwrite: bool,
    revision: str | None,
    offline: bool | None,
    cache_dir: Path | None,
    no_verify: bool,
    max_shard_size: str,
) -> dict[str, object]:
    """The common stage options as keyword arguments (unset ones left to their defaults)."""
    kwargs: dict[str, object] = {
        "output": output,
        "overwrite": overwrite,
        "revision": revision,
        "offline": offline,
        "cache_dir": cache_dir,
        "verify_checksums": not no_verify,
        "max_shard_size": max_shard_size,
    }
    if workdir is not None:
        kwargs["workdir"] = workdir
    return kwargs
