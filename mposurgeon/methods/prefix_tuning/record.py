"""The record of prefix tuning: trained keys and values for every attention module, kept beside
the model's input embeddings.

Files hold the embedding matrix unchanged and `E.prefix` (modules, 2, kv_heads,
num_virtual_tokens, head_dim), E the input-embedding module: attention module i (the i-th of
`attention_modules`, live names) attends to `E.prefix[i, 0]` (keys) and `E.prefix[i, 1]`
(values) before the input's own. No dense weight holds that: merge refuses it (load_model
runs it).
"""

from __future__ import annotations

import re
from typing import ClassVar

from pydantic import PositiveInt

from mposurgeon.methods.records import ModuleName, ModuleRecord

#: The prefix tensor's name.
PREFIX_KEY = re.compile(r"(?P<module>.+)\.prefix")


class PrefixRecord(ModuleRecord):
    """The input embeddings of a model whose `attention_modules` each attend first to
    `num_virtual_tokens` trained keys and values of `kv_heads` x `head_dim`."""

    num_virtual_tokens: PositiveInt
    attention_modules: list[ModuleName]
    kv_heads: PositiveInt
    head_dim: PositiveInt
    keeps_weight: ClassVar[bool] = True

    def prefix_shape(self) -> tuple[int, int, int, int, int]:
        return (
            len(self.attention_modules),
            2,
            self.kv_heads,
            self.num_virtual_tokens,
            self.head_dim,
        )

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {f"{self.name}.prefix": self.prefix_shape()}

    @classmethod
    def tensor_owner(cls, key: str) -> str | None:
        match = PREFIX_KEY.fullmatch(key)
        return match["module"] if match else None
