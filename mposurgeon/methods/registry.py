"""The registry of methods: the one place that lists them.

Stages, the manifest and `merge` ask the registry, never test a method's name. To add a
method, write its folder (`config.py` with a `MethodConfig`, `method.py` with a `Method`) and
add its config to `REGISTERED` below. Importing this module does not import torch: the
implementations are imported by `get_method`.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from mposurgeon.errors import UsageError
from mposurgeon.methods.adapter.config import AdapterConfig
from mposurgeon.methods.apet.config import ApetConfig
from mposurgeon.methods.bitfit.config import BitFitConfig
from mposurgeon.methods.config import MethodConfig
from mposurgeon.methods.dsee.config import DseeConfig
from mposurgeon.methods.full.config import FullConfig
from mposurgeon.methods.ia3.config import Ia3Config
from mposurgeon.methods.lightweight.config import LightweightConfig
from mposurgeon.methods.lora.config import LoraConfig
from mposurgeon.methods.mpo.config import MPOConfig
from mposurgeon.methods.mpoe.config import MPOEConfig
from mposurgeon.methods.overparam.config import OverparamConfig
from mposurgeon.methods.prefix_tuning.config import PrefixTuningConfig
from mposurgeon.methods.prompt_tuning.config import PromptTuningConfig
from mposurgeon.methods.records import ModuleRecord

if TYPE_CHECKING:
    from mposurgeon.methods.base import Method

#: Every registered method's config, in the order `--help` lists them.
REGISTERED: tuple[type[MethodConfig], ...] = (
    FullConfig,
    LightweightConfig,
    OverparamConfig,
    LoraConfig,
    DseeConfig,
    Ia3Config,
    PromptTuningConfig,
    PrefixTuningConfig,
    BitFitConfig,
    ApetConfig,
    AdapterConfig,
    MPOEConfig,
    MPOConfig,
)

_BY_NAME: dict[str, type[MethodConfig]] = {config.name: config for config in REGISTERED}
if len(_BY_NAME) != len(REGISTERED):
    raise RuntimeError("two registered methods share a name")


def method_names(*, training: bool = False) -> list[str]:
    """Names of the registered methods (with `training`, only those `train` selects)."""
    return [c.name for c in REGISTERED if c.trains or not training]


def method_config(name: str, *, training: bool = False) -> type[MethodConfig]:
    """The config class of method `name`; a usage error listing the names otherwise."""
    config = _BY_NAME.get(name)
    if config is None or (training and not config.trains):
        what = "not a training method" if config is not None else "not a known method"
        raise UsageError(
            f"{name!r} is {what}",
            hint=f"choose one of: {', '.join(method_names(training=training))}",
        )
    return config


def record_class(method: str) -> type[ModuleRecord] | None:
    """The record class of the modules owned by `method`; None for an unknown method or one
    that owns no records."""
    config = _BY_NAME.get(method)
    return config.record if config is not None else None


def get_method(config: MethodConfig | str) -> Method:
    """The implementation of a method, configured by `config` (a name: its defaults)."""
    if isinstance(config, str):
        config = method_config(config)()
    module, _, cls = type(config).implementation.partition(":")
    return getattr(import_module(module), cls)(config)


def methods_help() -> list[str]:
    """One line per training method: `full: dense fine-tuning ... (default lr 2e-05)`."""
    return [
        f"{c.name}: {c.summary} (default lr {c.default('lr'):g})" for c in REGISTERED if c.trains
    ]
