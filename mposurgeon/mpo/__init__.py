"""Pure MPO math (torch only): shapes, TT-SVD, canonical form, truncation, contraction, metrics.

Names are imported lazily from their modules, so that `mposurgeon.mpo.shapes` (which needs no
torch) can be imported without importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mposurgeon.mpo.contract import apply_mpo as apply_mpo
    from mposurgeon.mpo.contract import contract_flops as contract_flops
    from mposurgeon.mpo.contract import mpo_rows as mpo_rows
    from mposurgeon.mpo.contract import reconstruct_flops as reconstruct_flops
    from mposurgeon.mpo.contract import reconstruct_split as reconstruct_split
    from mposurgeon.mpo.contract import rows_flops as rows_flops
    from mposurgeon.mpo.contract import to_matrix as to_matrix
    from mposurgeon.mpo.contract import to_padded_matrix as to_padded_matrix
    from mposurgeon.mpo.decomposition import Decomposition as Decomposition
    from mposurgeon.mpo.decomposition import Truncation as Truncation
    from mposurgeon.mpo.decomposition import bond_spectra as bond_spectra
    from mposurgeon.mpo.decomposition import canonicalize as canonicalize
    from mposurgeon.mpo.decomposition import decompose as decompose
    from mposurgeon.mpo.decomposition import truncate as truncate
    from mposurgeon.mpo.metrics import entanglement_entropy as entanglement_entropy
    from mposurgeon.mpo.metrics import error_bound as error_bound
    from mposurgeon.mpo.metrics import measured_error as measured_error
    from mposurgeon.mpo.metrics import num_params as num_params
    from mposurgeon.mpo.metrics import relative_error as relative_error
    from mposurgeon.mpo.shapes import MPOShape as MPOShape
    from mposurgeon.mpo.shapes import bonds_of as bonds_of
    from mposurgeon.mpo.shapes import factorize as factorize
    from mposurgeon.mpo.shapes import modes_of as modes_of
    from mposurgeon.mpo.shapes import parse_mode_spec as parse_mode_spec
    from mposurgeon.mpo.shapes import plan_shape as plan_shape
    from mposurgeon.mpo.shapes import shape_from_modes as shape_from_modes

#: public name -> the module that defines it
_LAZY: dict[str, str] = {
    "apply_mpo": "mposurgeon.mpo.contract",
    "contract_flops": "mposurgeon.mpo.contract",
    "mpo_rows": "mposurgeon.mpo.contract",
    "reconstruct_flops": "mposurgeon.mpo.contract",
    "reconstruct_split": "mposurgeon.mpo.contract",
    "rows_flops": "mposurgeon.mpo.contract",
    "to_matrix": "mposurgeon.mpo.contract",
    "to_padded_matrix": "mposurgeon.mpo.contract",
    "Decomposition": "mposurgeon.mpo.decomposition",
    "Truncation": "mposurgeon.mpo.decomposition",
    "bond_spectra": "mposurgeon.mpo.decomposition",
    "canonicalize": "mposurgeon.mpo.decomposition",
    "decompose": "mposurgeon.mpo.decomposition",
    "truncate": "mposurgeon.mpo.decomposition",
    "entanglement_entropy": "mposurgeon.mpo.metrics",
    "error_bound": "mposurgeon.mpo.metrics",
    "measured_error": "mposurgeon.mpo.metrics",
    "num_params": "mposurgeon.mpo.metrics",
    "relative_error": "mposurgeon.mpo.metrics",
    "MPOShape": "mposurgeon.mpo.shapes",
    "bonds_of": "mposurgeon.mpo.shapes",
    "factorize": "mposurgeon.mpo.shapes",
    "modes_of": "mposurgeon.mpo.shapes",
    "parse_mode_spec": "mposurgeon.mpo.shapes",
    "plan_shape": "mposurgeon.mpo.shapes",
    "shape_from_modes": "mposurgeon.mpo.shapes",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mposurgeon.mpo' has no attribute {name!r}")
