"""Pure MPO math (torch only): shapes, TT-SVD, canonical form, truncation, contraction, metrics."""

from mposurgeon.mpo.contract import (
    apply_mpo,
    contract_flops,
    mpo_rows,
    reconstruct_flops,
    reconstruct_split,
    rows_flops,
)
from mposurgeon.mpo.decomposition import (
    Decomposition,
    Truncation,
    bond_spectra,
    canonicalize,
    decompose,
    to_matrix,
    to_padded_matrix,
    truncate,
)
from mposurgeon.mpo.metrics import (
    bonds_of,
    entanglement_entropy,
    error_bound,
    modes_of,
    num_params,
    relative_error,
)
from mposurgeon.mpo.shapes import (
    MPOShape,
    factorize,
    parse_mode_spec,
    plan_shape,
    shape_from_modes,
)

__all__ = [
    "Decomposition",
    "MPOShape",
    "Truncation",
    "apply_mpo",
    "bond_spectra",
    "bonds_of",
    "canonicalize",
    "contract_flops",
    "decompose",
    "entanglement_entropy",
    "error_bound",
    "factorize",
    "modes_of",
    "mpo_rows",
    "num_params",
    "parse_mode_spec",
    "plan_shape",
    "reconstruct_flops",
    "reconstruct_split",
    "relative_error",
    "rows_flops",
    "shape_from_modes",
    "to_matrix",
    "to_padded_matrix",
    "truncate",
]
