"""TT-SVD of a matrix into MPO cores, canonical forms, bond spectra and optimal truncation.

Cores have layout (r_{k-1}, I_k, J_k, r_k); see `mposurgeon.mpo.shapes` for how W is reshaped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from mposurgeon.errors import ShapeError
from mposurgeon.mpo.contract import to_matrix
from mposurgeon.mpo.metrics import FLOAT32_ERROR_FLOOR, error_bound, matrix_error, relative_error
from mposurgeon.mpo.shapes import MPOShape, bonds_of

MaxBond = int | Sequence[int] | None


@dataclass
class Decomposition:
    """cores: n tensors (r_{k-1}, I_k, J_k, r_k) in mixed-canonical form centred on the central
    core; spectra: n-1 float64 tensors, the full descending singular values at each inner bond
    before truncation; predicted_error: sqrt(sum discarded^2) / ||W||_F (0.0 when lossless)."""

    cores: list[Tensor]
    spectra: list[Tensor]
    predicted_error: float


@dataclass
class Truncation:
    """cores: truncated MPO (mixed-canonical, centred on (n-1)//2); spectra: singular values of
    each inner bond just before it was cut (float64); bonds: kept dims (length n+1);
    predicted_error: sqrt(sum discarded^2) / ||W||_F of the input MPO."""

    cores: list[Tensor]
    spectra: list[Tensor]
    bonds: tuple[int, ...]
    predicted_error: float


def _bond_targets(max_bond: MaxBond, num_bonds: int) -> list[int | None]:
    """Per inner bond maximum (None = unlimited)."""
    if max_bond is None or isinstance(max_bond, int):
        targets: list[int | None] = [max_bond] * num_bonds
    else:
        targets = [int(b) for b in max_bond]
        if len(targets) != num_bonds:
            raise ValueError(f"max_bond needs {num_bonds} per-bond values, got {len(targets)}")
    if any(t is not None and t < 1 for t in targets):
        raise ValueError(f"bond dims must be >= 1, got {max_bond}")
    return targets


def _budget(rel_tol: float | None, norm: float, num_bonds: int) -> float | None:
    """Per-bond allowance of discarded s^2: (rel_tol * ||W||)^2 / (n-1), so the total holds."""
    if rel_tol is None:
        return None
    if rel_tol < 0:
        raise ValueError(f"rel_tol must be >= 0, got {rel_tol}")
    return (rel_tol * norm) ** 2 / max(num_bonds, 1)


def _rank(s2: Tensor, target: int | None, budget: float | None) -> int:
    """How many of the descending squared singular values s2 to keep (at least 1)."""
    rank = s2.numel()
    if target is not None:
        rank = min(rank, target)
    if budget is not None:
        tail = s2.double().flip(0).cumsum(0)  # tail[i] = sum of the i+1 smallest
        rank = min(rank, s2.numel() - int((tail <= budget).sum()))
    return max(rank, 1)


_GRAM_BLOCK = 128  # row block of the Gram: blocks above the diagonal are skipped
_GRAM_CHUNK = 2048  # columns converted at a time when the Gram's dtype differs from the rows'


def _gram_lower(rows: Tensor, dtype: torch.dtype) -> Tensor:
    """Lower triangle (all that eigh reads) of rows @ rows.T, rows (m, N), accumulated in dtype.

    Row block b only meets rows up to its own end, which skips most of the upper triangle.
    """
    m = rows.shape[0]
    gram = rows.new_zeros(m, m, dtype=dtype)
    for chunk in [rows] if rows.dtype == dtype else rows.split(_GRAM_CHUNK, dim=1):
        chunk = chunk.to(dtype)
        for start in range(0, m, _GRAM_BLOCK):
            stop = min(start + _GRAM_BLOCK, m)
            gram[start:stop, :stop].addmm_(chunk[start:stop], chunk[:stop].mT)
    return gram


def _split(
    mat: Tensor,
    left: bool,
    target: int | None,
    budget: float | None,
    gram_dtype: torch.dtype,
    out: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """One TT-SVD step at a bond.

    left:  mat (m, N) = basis @ remainder, basis (m, r) orthonormal columns, remainder (r, N).
    right: mat (N, m) = remainder @ basis.T, basis (m, r), remainder (N, r).
    Returns (basis, remainder, spectrum), the remainder written into the flat buffer `out` and
    the full spectrum in float64 (min(m, N) values). When m <= N, the basis is the eigenbasis
    (float64 eigh) of the m x m Gram matrix formed in gram_dtype, and the remainder is the exact
    projection of mat onto it (no division by singular values); otherwise a thin SVD.
    """
    rows = mat if left else mat.mT
    m, other = rows.shape
    if m <= other:
        eigvals, eigvecs = torch.linalg.eigh(_gram_lower(rows, gram_dtype).double(), UPLO="L")
        s2 = eigvals.flip(0).clamp_min(0)
        rank = _rank(s2, target, budget)
        basis = eigvecs.flip(1)[:, :rank].to(mat.dtype)
        shape = (rank, other) if left else (other, rank)
        remainder = out[: rank * other].view(shape)
        torch.matmul(*((basis.mT, mat) if left else (mat, basis)), out=remainder)
        return basis, remainder, s2.sqrt()
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    rank = _rank(s.double().square(), target, budget)
    if left:
        basis, product = u[:, :rank], s[:rank, None] * vh[:rank]
    else:
        basis, product = vh[:rank].mT, u[:, :rank] * s[:rank]
    remainder = out[: product.numel()].view(product.shape).copy_(product)
    return basis, remainder, s.double()


def _interleaved(matrix: Tensor, shape: MPOShape) -> Tensor:
    """(out_dim, in_dim) -> zero-padded, permuted to (I1, J1, ..., In, Jn); always a new tensor."""
    if shape.out_padding or shape.in_padding:
        padded = matrix.new_empty(shape.padded_out, shape.padded_in)
        padded[: shape.out_dim, : shape.in_dim] = matrix
        padded[shape.out_dim :].zero_()
        padded[: shape.out_dim, shape.in_dim :].zero_()
        matrix = padded
    n = shape.num_cores
    order = [p for k in range(n) for p in (k, n + k)]
    interleaved = matrix.reshape(*shape.out_modes, *shape.in_modes).permute(order)
    return interleaved.clone(memory_format=torch.contiguous_format)


@contextmanager
def _exact_float32_matmul() -> Iterator[None]:
    """No TF32 / reduced-precision float32 matmuls inside (decompositions promise round-off)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def decompose(
    matrix: Tensor,
    shape: MPOShape,
    *,
    max_bond: MaxBond = None,
    rel_tol: float | None = None,
    gram_dtype: torch.dtype | None = None,
    dtype: torch.dtype | None = None,
) -> Decomposition:
    """TT-SVD of matrix (out_dim, in_dim) into cores (r_{k-1}, I_k, J_k, r_k); lossless by default.

    Sweeps from both ends toward the central core; each bond takes the eigenbasis of the Gram
    matrix of the remainder's smaller side. With max_bond / rel_tol the bases are cut (rel_tol
    spreads (rel_tol * ||W||)^2 evenly over the n-1 bonds). Grams are float64, except for a
    lossless float32 decomposition, which forms them in float32 for speed (its spectra are then
    accurate to ~1e-8 * (s_max / s)^2 relative); `gram_dtype` overrides that choice. Cores come
    back on matrix's device, in `dtype` (default: matrix's). The work runs in float32 (float64
    for a float64 matrix or `dtype`) on one permuted copy of the matrix and one buffer of its
    size: a half-precision matrix is converted as it is copied, so it need not be widened first.
    """
    if matrix.dim() != 2 or tuple(matrix.shape) != (shape.out_dim, shape.in_dim):
        raise ShapeError(
            f"matrix of shape {tuple(matrix.shape)} does not match the MPO shape "
            f"{shape.out_dim}x{shape.in_dim}"
        )
    n, centre = shape.num_cores, shape.central_index
    work_dtype = torch.float64 if torch.float64 in (matrix.dtype, dtype) else torch.float32
    lossless = max_bond is None and rel_tol is None
    if gram_dtype is None:
        gram_dtype = work_dtype if lossless else torch.float64
    targets = _bond_targets(max_bond, n - 1)
    left: list[Tensor] = []  # cores 0..centre-1, split off at bonds 1..centre
    right: list[Tensor] = []  # cores n-1..centre+1, split off at bonds n-1..centre+1
    left_spectra: list[Tensor] = []
    right_spectra: list[Tensor] = []
    with torch.no_grad(), _exact_float32_matmul():
        # the remainder lives in one flat buffer while the next is written into the other
        holder = _interleaved(matrix.to(work_dtype), shape).reshape(-1)
        spare = torch.empty_like(holder)
        budget = _budget(rel_tol, float(torch.linalg.vector_norm(holder)), n - 1)
        remainder = holder.view(1, -1)  # (r_k, rest)
        for k in range(centre):
            i, j = shape.out_modes[k], shape.in_modes[k]
            mat = remainder.view(-1, remainder.shape[1] // (i * j))
            basis, remainder, spectrum = _split(mat, True, targets[k], budget, gram_dtype, spare)
            holder, spare = spare, holder
            left.append(basis.reshape(-1, i, j, basis.shape[1]))
            left_spectra.append(spectrum)
        remainder = remainder.view(-1, 1)  # (rest, r_k)
        for k in range(n - 1, centre, -1):
            i, j, r = shape.out_modes[k], shape.in_modes[k], remainder.shape[1]
            mat = remainder.view(-1, i * j * r)
            basis, remainder, spectrum = _split(
                mat, False, targets[k - 1], budget, gram_dtype, spare
            )
            holder, spare = spare, holder
            right.append(basis.mT.reshape(-1, i, j, r))
            right_spectra.append(spectrum)
        i, j = shape.out_modes[centre], shape.in_modes[centre]
        central = remainder.view(-1, i, j, remainder.shape[1])
        if central.numel() < holder.numel():  # truncated: do not keep the whole buffer alive
            central = central.clone()
        cores = [*left, central, *right[::-1]]
    spectra = left_spectra + right_spectra[::-1]
    cores = [core.to(dtype or matrix.dtype).contiguous() for core in cores]
    return Decomposition(cores, spectra, error_bound(spectra, bonds_of(cores)))


def canonicalize(cores: Sequence[Tensor], center: int) -> list[Tensor]:
    """Mixed-canonical form by QR sweeps: cores before `center` left-orthogonal ((r I J, r')
    has orthonormal columns), cores after it right-orthogonal ((r, I J r') has orthonormal rows).
    The represented matrix is unchanged; a bond may shrink where it exceeded its rank bound."""
    n = len(cores)
    if not 0 <= center < n:
        raise ValueError(f"center {center} out of range for {n} cores")
    result = list(cores)
    for k in range(center):
        r, i, j, _ = result[k].shape
        q, upper = torch.linalg.qr(result[k].reshape(r * i * j, -1))
        result[k] = q.reshape(r, i, j, -1)
        result[k + 1] = torch.tensordot(upper, result[k + 1], dims=1)
    for k in range(n - 1, center, -1):
        _, i, j, r = result[k].shape
        q, upper = torch.linalg.qr(result[k].reshape(result[k].shape[0], -1).mT)
        result[k] = q.mT.reshape(-1, i, j, r)
        result[k - 1] = torch.tensordot(result[k - 1], upper.mT, dims=1)
    return result


def _svd_sweep(
    cores: Sequence[Tensor], targets: list[int | None], rel_tol: float | None
) -> tuple[list[Tensor], list[Tensor], tuple[int, ...]]:
    """Right-canonicalize (float64), then SVD each bond left to right, cutting as asked.

    Returns (cores in float64, left-orthogonal up to the last; spectra before each cut; kept bonds).
    With every core right of bond k right-orthogonal and every core left of it left-orthogonal,
    the singular values at bond k are exactly those of the represented matrix's unfolding.
    """
    work = canonicalize([core.double() for core in cores], 0)
    budget = _budget(rel_tol, float(torch.linalg.vector_norm(work[0])), len(work) - 1)
    spectra: list[Tensor] = []
    for k in range(len(work) - 1):
        r, i, j, _ = work[k].shape
        u, s, vh = torch.linalg.svd(work[k].reshape(r * i * j, -1), full_matrices=False)
        rank = _rank(s.square(), targets[k], budget)
        spectra.append(s)
        work[k] = u[:, :rank].reshape(r, i, j, rank)
        work[k + 1] = torch.tensordot(s[:rank, None] * vh[:rank], work[k + 1], dims=1)
    return work, spectra, bonds_of(work)


@torch.no_grad()
def bond_spectra(cores: Sequence[Tensor]) -> list[Tensor]:
    """Exact singular values (float64, descending) of every inner bond's unfolding of the matrix
    the cores represent, whatever their gauge (e.g. after fine-tuning)."""
    return _svd_sweep(cores, [None] * (len(cores) - 1), None)[1]


@torch.no_grad()
def truncate(
    cores: Sequence[Tensor], *, max_bond: MaxBond = None, rel_tol: float | None = None
) -> Truncation:
    """Optimal sequential truncation: canonicalize, then cut each bond by SVD.

    max_bond: one cap for all inner bonds or one per inner bond (n-1 values; a bond keeps
    min(current, target)); rel_tol: total relative error allowed, spread evenly over the bonds.
    """
    n = len(cores)
    work, spectra, kept = _svd_sweep(cores, _bond_targets(max_bond, n - 1), rel_tol)
    result = canonicalize(work, (n - 1) // 2)
    result = [core.to(cores[k].dtype) for k, core in enumerate(result)]
    return Truncation(result, spectra, bonds_of(result), error_bound(spectra, kept))


#: `gram_spectra` falls back to `bond_spectra` when ||L_b||_F ||R_b||_F exceeds ||W||^2 by more
#: than this (a gauge so far from canonical that float64 Grams would lose more than ~1e-8)
_GAUGE_LIMIT = 1e8


@torch.no_grad()
def gram_spectra(cores: Sequence[Tensor]) -> list[Tensor]:
    """`bond_spectra` (same lengths, float64, descending) without a canonical sweep.

    At inner bond b, W's unfolding is A_b @ B_b (A_b: cores before b, B_b: cores from b on); its
    squared singular values are the eigenvalues of L_b R_b, L_b = A_b^T A_b and R_b = B_b B_b^T
    (r_b x r_b), built core by core in float64 in one pass from each end (through a square
    factor of the previous Gram, so that each step is one product and half a Gram, the
    triangle `eigh` reads). Each s^2 is exact to
    ~1e-16 ||L_b|| ||R_b|| absolute (~1e-16 s_max^2 in a canonical gauge): small singular
    values are only absolutely accurate, which is all an error bound or an allocation reads
    (they sum s^2). About a quarter of `bond_spectra`'s time on a 5632x2048 module; in a gauge
    where ||L_b||_F ||R_b||_F > 1e8 ||W||^2 it returns `bond_spectra(cores)`. Float64 because it
    changes results: from float32 Grams, a --param-ratio 0.3 plan of MiniLM's 36 modules
    differs from `bond_spectra`'s in 2 modules (float64: in none, at 0.3, 0.5 and 0.8).
    """
    n = len(cores)
    if n < 2:
        return []
    one = torch.ones(1, 1, dtype=torch.float64)
    left = [(one, one)]  # left[b]: (||L_b||_F, F with L_b = F F^T), b = 0 .. n-1
    for core in cores[:-1]:
        c = core.double()
        r, i, j, r_next = c.shape
        x = (left[-1][1].mT @ c.reshape(r, -1)).reshape(r * i * j, r_next)
        gram = _symmetric(_gram_lower(x.mT, torch.float64))  # L = x^T x
        left.append((torch.linalg.vector_norm(gram), _factor(gram)))
    right = [one]  # R_n, R_{n-1}, ..., R_1
    for core in cores[:0:-1]:
        c = core.double()
        r, i, j, r_next = c.shape
        y = (c.reshape(-1, r_next) @ _factor(right[-1])).reshape(r, -1)
        right.append(_symmetric(_gram_lower(y, torch.float64)))  # R = y y^T
    right = right[::-1]  # right[b - 1]: R_b, b = 1 .. n
    spectra = []
    for b, length in enumerate(_sweep_lengths(cores), start=1):
        norm, half = left[b]
        s2 = torch.linalg.eigvalsh(half.mT @ right[b - 1] @ half).flip(0).clamp_min(0)
        total = float(s2.sum())
        scale = float(norm) * float(torch.linalg.vector_norm(right[b - 1]))
        if scale > _GAUGE_LIMIT * total and total > 0.0:
            return bond_spectra(cores)
        spectra.append(s2[:length].sqrt())
    return spectra


def _factor(gram: Tensor) -> Tensor:
    """A square F with F F^T = gram (symmetric positive semi-definite): its Cholesky factor,
    or from its eigendecomposition where Cholesky fails (a singular gram)."""
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return factor
    eigvals, eigvecs = torch.linalg.eigh(gram)
    return eigvecs * eigvals.clamp_min(0).sqrt()


def _symmetric(lower: Tensor) -> Tensor:
    """The symmetric matrix whose lower triangle is `lower`'s."""
    return lower.tril() + lower.tril(-1).mT


def _sweep_lengths(cores: Sequence[Tensor]) -> list[int]:
    """Lengths of `bond_spectra`'s spectra: the bonds after its right-to-left QR sweep
    (r_b <= d_b r_{b+1}) and left-to-right SVD sweep (r_b <= r_{b-1} d_{b-1})."""
    bonds = list(bonds_of(cores))
    sites = [core.shape[1] * core.shape[2] for core in cores]
    for b in range(len(cores) - 1, 0, -1):
        bonds[b] = min(bonds[b], sites[b] * bonds[b + 1])
    for b in range(1, len(cores)):
        bonds[b] = min(bonds[b], bonds[b - 1] * sites[b - 1])
    return bonds[1:-1]


@torch.no_grad()
def recompress(
    cores: Sequence[Tensor], shape: MPOShape, max_bond: MaxBond
) -> tuple[Truncation, Tensor]:
    """Cut an MPO in any gauge to at most `max_bond` by TT-SVD of the matrix it represents.

    The cores are contracted once into W (out_dim, in_dim; float64 for float64 cores, float32
    otherwise) and W is decomposed with these caps (`decompose`: a sweep from both ends, each
    bond cut to the leading eigenvectors of a Gram formed in W's dtype; a float32 cut whose
    error is below `FLOAT32_ERROR_FLOOR` is done again with float64 Grams, where float32's
    ~1e-7 s_max^2 in each eigenvalue would show. Above it the float32 Grams change nothing
    measurable: on MiniLM's attention and a random 5632x2048 matrix, at 0.25-0.9 of the bonds,
    the cut's error agreed with float64 Grams' to 1e-8). Returns (the truncation, W): cores
    in the input cores' dtype, mixed-canonical on the central core; spectra of each bond just
    before its cut; predicted_error sqrt(sum of discarded s^2) / ||W||, exact in exact
    arithmetic (each cut is an orthogonal projection nested in the earlier ones; with padded
    modes it is the error over the padded matrix, a bound of W's). One contraction plus a
    truncated `decompose`: on a 5632x2048 module 0.4 s, where `truncate` (canonical sweep of
    the cores) takes 2.3 s.
    """
    work = torch.float64 if any(core.dtype == torch.float64 for core in cores) else torch.float32
    matrix = to_matrix([core.to(work) for core in cores], shape)
    result = decompose(matrix, shape, max_bond=max_bond, gram_dtype=work)
    if result.predicted_error < FLOAT32_ERROR_FLOOR and work != torch.float64:
        result = decompose(matrix, shape, max_bond=max_bond, gram_dtype=torch.float64)
    cut = [core.to(cores[k].dtype).contiguous() for k, core in enumerate(result.cores)]
    return Truncation(cut, result.spectra, bonds_of(cut), result.predicted_error), matrix


def truncation_error(
    cores: Sequence[Tensor], matrix: Tensor, cut: Truncation, shape: MPOShape
) -> float:
    """||W - W_cut||_F / ||W||_F for `cut, matrix = recompress(cores, ...)`, W_cut as
    `cut.cores` store it: the cut cores contracted once (in `matrix`'s dtype) and compared
    with `matrix`. (`cut.predicted_error` is the same in exact arithmetic, but its discarded
    s^2 come from Gram eigenvalues, accurate to ~1e-16 s_max^2: 2e-6 relative at an error of
    1e-5 in float64; and it cannot see cores rounded after the cut.) A float32 error below
    `FLOAT32_ERROR_FLOOR`, where float32 round-off shows, is measured again with both MPOs
    contracted in float64 (`matrix_error`).
    """
    rebuilt = to_matrix([core.to(matrix.dtype) for core in cut.cores], shape)
    error = relative_error(matrix, rebuilt)
    if error >= FLOAT32_ERROR_FLOOR or matrix.dtype == torch.float64:
        return error
    del rebuilt
    return matrix_error(cores, cut.cores, shape)
