"""The record of prompt tuning: virtual tokens kept beside the model's input embeddings.

Files hold the embedding matrix unchanged and `E.prompt` (num_virtual_tokens, hidden), where E
is the input-embedding module: the model reads [prompt; embeddings of the input]. No dense
weight holds that: merge refuses it (load_model runs it, export-peft hands it to PEFT).
"""

from __future__ import annotations

import re
from typing import ClassVar

from pydantic import PositiveInt

from mposurgeon.methods.records import ModuleRecord

#: The prompt tensor's name.
PROMPT_KEY = re.compile(r"(?P<module>.+)\.prompt")


class PromptRecord(ModuleRecord):
    """The input embeddings of a model that reads `num_virtual_tokens` trained vectors first."""

    num_virtual_tokens: PositiveInt
    keeps_weight: ClassVar[bool] = True

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {f"{self.name}.prompt": (self.num_virtual_tokens, self.shape[1])}

    @classmethod
    def tensor_owner(cls, key: str) -> str | None:
        match = PROMPT_KEY.fullmatch(key)
        return match["module"] if match else None
