"""Typer option types shared by the commands (one definition per flag), and `shared_flags`,
which adds the flags the stage commands share to a command and hands it one `StageFlags`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any

import typer

from mposurgeon.cli.render import DEFAULT_LOG_INTERVAL, LOG_FORMATS

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
    str,
    typer.Option(
        "--max-shard-size",
        help="Largest safetensors shard, e.g. 5GB or 500MB; auto (default): the input's "
        "largest shard, at most 500MB.",
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
# The data flags (training/data.py `DataOptions`): which data set, split, columns and task.
DataConfig = Annotated[
    str | None,
    typer.Option("--data-config", help="Configuration of a data set id (glue: sst2, mrpc, ...)."),
]
Split = Annotated[
    str | None,
    typer.Option("--split", help="Split of a saved DatasetDict or data set id (default train)."),
]
TextColumn = Annotated[
    str | None,
    typer.Option(
        "--text-column",
        help="Column of the input text (default text, text_a; prompt, source).",
    ),
]
TextPairColumn = Annotated[
    str | None,
    typer.Option("--text-pair-column", help="Column of a pair's second text (default text_b)."),
]
LabelColumn = Annotated[
    str | None, typer.Option("--label-column", help="Column of the label (default label).")
]
TargetColumn = Annotated[
    str | None,
    typer.Option(
        "--target-column",
        help="Column of the text to produce (default completion, target).",
    ),
]
Task = Annotated[
    str | None,
    typer.Option(
        "--task",
        help="classification, regression, causal-lm or seq2seq (default: inferred: labels "
        "with fractions are regression, data without labels the model's LM task).",
    ),
]
Generate = Annotated[
    bool,
    typer.Option(
        "--generate",
        help="causal-lm, seq2seq: also score exact match of greedy generations.",
    ),
]
MaxNewTokens = Annotated[
    int, typer.Option("--max-new-tokens", help="--generate: tokens generated per row at most.")
]
Precision = Annotated[
    str | None,
    typer.Option(
        "--precision",
        help="fp32, or bf16 / fp16 mixed precision (autocast; bf16 runs on the CPU too). "
        "Default: accelerate launch's --mixed_precision, else fp32.",
    ),
]
Device = Annotated[
    str, typer.Option("--device", help="auto (a GPU when there is one), cpu or cuda.")
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]


def _log_format(value: str) -> str:
    """`--log-format`'s value, checked (a usage error names the choices)."""
    if value not in LOG_FORMATS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(LOG_FORMATS)}")
    return value


LogFormat = Annotated[
    str,
    typer.Option(
        "--log-format",
        callback=_log_format,
        metavar="[text|json]",
        help="Progress off a terminal as text lines, or json: one JSON object per line on "
        "stderr (on a terminal too, and with --json).",
    ),
]
LogInterval = Annotated[
    float,
    typer.Option(
        "--log-interval",
        min=0.0,
        help="Seconds between two progress lines of a task off a terminal or with "
        "--log-format json (0: every report).",
    ),
]
#: `--push-to-hub` and `--private` of the commands whose output can be pushed (merge, train).
PushToHub = Annotated[
    str | None,
    typer.Option(
        "--push-to-hub",
        help="Upload the output, once written, to this Hub model repository (namespace/name), "
        "creating it if need be; the token is huggingface_hub's (HF_TOKEN, hf auth login).",
    ),
]
Private = Annotated[
    bool,
    typer.Option("--private", help="Create the --push-to-hub repository private (if new)."),
]
PeftBase = Annotated[
    str | None,
    typer.Option(
        "--base",
        help="A PEFT adapter's base model: directory, alias or hub id in the local cache "
        "(default: base_model_name_or_path of its adapter_config.json).",
    ),
]


@dataclass(frozen=True)
class StageFlags:
    """The flags the stage commands share, as parsed (a flag a command lacks has its default)."""

    output: Path | None = None
    workdir: Path | None = None
    overwrite: bool = False
    revision: str | None = None
    offline: bool | None = None
    cache_dir: Path | None = None
    no_verify: bool = False
    max_shard_size: str = "auto"
    json_out: bool = False
    quiet: bool = False
    log_format: str = "text"
    log_interval: float = DEFAULT_LOG_INTERVAL

    @property
    def no_progress(self) -> bool:
        """Whether progress is off: `-q`, or `--json` (stdout is the object) unless
        `--log-format json` asks for JSON progress lines on stderr."""
        return self.quiet or (self.json_out and self.log_format != "json")

    def stage_kwargs(self) -> dict[str, object]:
        """The common stage options as keyword arguments (an unset workdir left to its default)."""
        kwargs: dict[str, object] = {
            "output": self.output,
            "overwrite": self.overwrite,
            "revision": self.revision,
            "offline": self.offline,
            "cache_dir": self.cache_dir,
            "verify_checksums": not self.no_verify,
            "max_shard_size": self.max_shard_size,
        }
        if self.workdir is not None:
            kwargs["workdir"] = self.workdir
        return kwargs


#: Each shared flag's Typer type; its default is `StageFlags`'.
_FLAG_TYPES: dict[str, Any] = {
    "output": Output,
    "workdir": Workdir,
    "overwrite": Overwrite,
    "revision": Revision,
    "offline": Offline,
    "cache_dir": CacheDir,
    "no_verify": NoVerify,
    "max_shard_size": MaxShardSize,
    "json_out": Json,
    "quiet": Quiet,
    "log_format": LogFormat,
    "log_interval": LogInterval,
}
#: Every shared flag, in the order `--help` lists them: a stage that reads a model or artifact
#: (a hub id too) and writes an artifact takes them all.
STAGE_FLAGS: tuple[str, ...] = tuple(f.name for f in fields(StageFlags))
#: The progress flags (`-q`, `--log-format`, `--log-interval`) of a command that reports
#: progress.
PROGRESS_FLAGS: tuple[str, ...] = ("quiet", "log_format", "log_interval")
#: The flags that resolve a hub id (`--revision`, `--offline`, `--cache-dir`).
HUB_FLAGS: tuple[str, ...] = ("revision", "offline", "cache_dir")
#: The flags of a stage whose input is an artifact directory (no hub flags).
ARTIFACT_STAGE_FLAGS: tuple[str, ...] = tuple(f for f in STAGE_FLAGS if f not in HUB_FLAGS)


def shared_flags(*names: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Add the shared flags `names` (of `STAGE_FLAGS`) to a command, after its own parameters.

    The command declares a keyword-only `flags: StageFlags` instead of the flags themselves and
    receives them in it. Typer reads the parameters from the `__signature__` set here.

        @shared_flags(*ARTIFACT_STAGE_FLAGS)
        def merge_command(artifact: ..., dtype: ... = "auto", *, flags: StageFlags) -> None:
    """
    return _flag_group("flags", StageFlags, _FLAG_TYPES, names)


@dataclass(frozen=True)
class DataFlags:
    """The data flags (`DataOptions` of training/data.py, and the task), as parsed."""

    data_config: str | None = None
    split: str | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    target_column: str | None = None
    task: str | None = None
    generate: bool = False
    max_new_tokens: int = 32

    def options(self) -> dict[str, object]:
        """The flags as keyword arguments of `TrainOptions` / `EvalOptions`."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


_DATA_FLAG_TYPES: dict[str, Any] = {
    "data_config": DataConfig,
    "split": Split,
    "text_column": TextColumn,
    "text_pair_column": TextPairColumn,
    "label_column": LabelColumn,
    "target_column": TargetColumn,
    "task": Task,
    "generate": Generate,
    "max_new_tokens": MaxNewTokens,
}


def data_flags(split: Any = Split) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Add the data flags (`DataFlags`) to a command, which declares a keyword-only
    `data_flags: DataFlags` and receives them in it; `split` is the Typer type of `--split`
    (its help names the default split)."""
    return _flag_group(
        "data_flags", DataFlags, {**_DATA_FLAG_TYPES, "split": split}, tuple(_DATA_FLAG_TYPES)
    )


def _flag_group(
    param: str, group: type, types: dict[str, Any], names: tuple[str, ...]
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Add the flags `names` (Typer types `types`, defaults those of dataclass `group`) to a
    command after its own parameters, and hand them to it as one `group` in `param`."""
    unknown = [n for n in names if n not in types]
    if unknown:
        raise ValueError(f"not shared flags of {group.__name__}: {unknown}")
    defaults = group()

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        own = inspect.signature(command, eval_str=True)
        if param not in own.parameters:
            raise TypeError(f"{command.__name__} needs a keyword-only `{param}: {group.__name__}`")
        clash = [n for n in names if n in own.parameters]
        if clash:
            raise TypeError(f"{command.__name__} declares {group.__name__} itself: {clash}")
        added = [
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=getattr(defaults, name),
                annotation=types[name],
            )
            for name in names
        ]
        kept = [p for p in own.parameters.values() if p.name != param]

        @functools.wraps(command)
        def run(**kwargs: Any) -> None:
            given = {name: kwargs.pop(name) for name in names}
            command(**kwargs, **{param: group(**given)})

        run.__signature__ = own.replace(parameters=[*kept, *added])  # type: ignore[attr-defined]
        return run

    return decorate
