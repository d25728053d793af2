"""Half-precision checkpoints through decompose, load_model and merge (issue 17, item 3).

bfloat16 and float16 weights get float32 cores by default, and a lossless decompose stores the
few entries their contraction, rounded once, misses (the rounding fixup): merge gives every
tensor back bitwise, zeros and subnormals included, and the manifest records error 0.0. A
fixup holds for the cores it was made for only: trained or truncated cores merge to their own
contraction rounded once. Half-precision cores, when asked for, record their rounding in
`predicted_error`; MPO layers contract half-precision cores in float32 and round once, as merge
does; and `merge --verify` compares the factorized model evaluating exactly the weights merge
writes, so that rounding takes none of its tolerance and a core off by 1% of the matrix norm
fails it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, LlamaForCausalLM

import mposurgeon
from mposurgeon.artifact.load import load_model
from mposurgeon.artifact.manifest import load_artifact
from mposurgeon.artifact.tensors import TensorReader
from mposurgeon.errors import ArtifactError
from mposurgeon.methods.mpo.record import MPORecord
from mposurgeon.methods.mpo.state import (
    dense_weight,
    factorize_weight,
    record_cores,
    record_fixup,
)
from mposurgeon.models.layers import (
    Fixup,
    MPOCores,
    MPOEmbedding,
    MPOLinear,
    cores_fingerprint,
    rounding_fixup,
)
from mposurgeon.models.orientation import as_matrix
from mposurgeon.models.probe import model_output, sample_batch
from mposurgeon.mpo.contract import apply_mpo, to_matrix
from mposurgeon.mpo.shapes import MPOShape, plan_shape
from mposurgeon.stages import merge as merge_stage
from tests.cli_runner import assert_one_line_error, run_cli
from tests.tiny_models import TINY_MODELS, build_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN = Path(__file__).resolve().parents[1] / "data" / "sentiment-train.jsonl"

#: Unit roundoff of each half-precision dtype.
U = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def _bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (zeros' signs included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.view(ints), b.view(ints))


def _rounded_contraction(rec: MPORecord, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The module's weight as its cores give it, contracted in float32 and rounded once to
    the recorded dtype, without any fixup."""
    return dense_weight(rec, record_cores(rec, tensors)).to(getattr(torch, rec.dtype))


def _records(artifact: Path) -> dict[str, MPORecord]:
    modules = load_artifact(artifact, verify=False).modules
    return {r.weight_key: r for r in modules.values() if isinstance(r, MPORecord)}


def _repaired(artifact: Path) -> MPORecord:
    """The first module of `artifact` whose fixup changes its rounded contraction."""
    tensors = _tensors(artifact)
    for rec in _records(artifact).values():
        fixup = record_fixup(rec, tensors)
        if fixup is None:
            continue
        rounded = _rounded_contraction(rec, tensors)
        fixed = rounded.clone()
        fixup.apply(as_matrix(fixed, rec.kind))
        if not _bitwise(fixed, rounded):
            return rec
    raise AssertionError(f"no fixup of {artifact} changes its module's weight")


def _save_half(arch: str, dtype: torch.dtype, out: Path) -> Path:
    """The tiny `arch` (a key of TINY_MODELS: "llama" as a causal LM, "bert" as a bare
    encoder, "gpt2"...) with random weights, saved in `dtype`."""
    class_name, config_name, kwargs = TINY_MODELS[arch]
    if arch == "bert":
        class_name = "BertModel"
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**kwargs, dtype=dtype)
    model = getattr(transformers, class_name)(config)
    model.to(dtype).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def half_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`half_model("llama")`: the tiny Llama in bfloat16; `half_model("bert")`: the tiny BERT
    in float16 (each built once)."""
    cache: dict[str, Path] = {}
    dtypes = {"llama": torch.bfloat16, "bert": torch.float16}

    def get(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = _save_half(arch, dtypes[arch], tmp_path_factory.mktemp(arch) / "m")
        return cache[arch]

    return get


@pytest.fixture(scope="module")
def llama_dec(half_model: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bfloat16 Llama decomposed with default options (FFN and attention, lossless)."""
    out = tmp_path_factory.mktemp("llama-dec") / "dec"
    mposurgeon.decompose(half_model("llama"), output=out)
    return out


@pytest.fixture(scope="module")
def planted_dec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bfloat16 Llama with zeros and tiny entries planted in one matrix (whose float32
    contraction rounds some of them wrong, on any machine: a zero comes back as +-1e-11),
    decomposed with default options: an artifact with a fixup that changes a weight."""
    source, _ = _save_planted("llama", torch.bfloat16, tmp_path_factory.mktemp("planted") / "m")
    out = source.parent / "dec"
    mposurgeon.decompose(source, output=out)
    return out


@pytest.fixture(scope="module")
def llama_merged(llama_dec: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("llama-merged") / "merged"
    mposurgeon.merge(llama_dec, output=out)
    return out


# -- decompose ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_half_weights_merge_back_bitwise(
    arch: str, half_model: Callable[[str], Path], tmp_path: Path
) -> None:
    """Default options: float32 cores, a rounding fixup where the rounded contraction misses
    entries (listed in the record: int64 indices, the original values), error 0.0 recorded,
    and the merge gives back every tensor bitwise. float64 cores too."""
    source = half_model(arch)
    original = _tensors(source)
    dtype = next(iter(original.values())).dtype
    result = mposurgeon.decompose(source, output=tmp_path / "dec")
    records = {m.record.weight_key: m.record for m in result.modules if m.record is not None}
    assert len(records) == {"llama": 14, "bert": 12}[arch]  # 2 x (4 attention + 3 or 2 FFN)
    stored = _tensors(tmp_path / "dec")
    for rec in records.values():
        assert rec.dtype == str(dtype).removeprefix("torch.")
        assert {stored[k].dtype for k in rec.core_keys()} == {torch.float32}
        assert rec.rel_error == 0.0 and rec.predicted_error == 0.0
        if rec.fixup is not None:
            index_key, value_key = rec.fixup_keys()
            assert rec.tensor_shapes()[index_key] == (rec.fixup.count,)
            assert stored[index_key].dtype == torch.int64 and stored[value_key].dtype == dtype
            assert rec.fixup.count < 0.05 * rec.out_dim * rec.in_dim
    assert any(rec.fixup is not None for rec in records.values())
    mposurgeon.merge(tmp_path / "dec", output=tmp_path / "merged")
    merged = _tensors(tmp_path / "merged")
    assert merged.keys() == original.keys()
    assert [k for k, w in original.items() if not _bitwise(merged[k], w)] == []

    mposurgeon.decompose(source, output=tmp_path / "dec64", dtype="float64")
    mposurgeon.merge(tmp_path / "dec64", output=tmp_path / "merged64")
    exact = _tensors(tmp_path / "merged64")
    assert [k for k, w in original.items() if not _bitwise(exact[k], w)] == []


def _plant_edge_values(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (2-D, >= 6 rows and 8 columns) with a row of zeros, negative zeros,
    subnormals and tiny normals of its dtype (and a large entry, so that they are far below
    the matrix's scale)."""
    info = torch.finfo(weight.dtype)
    out = weight.clone()
    out[0] = 0.0
    out[1, :8] = -0.0
    out[2, :8] = torch.tensor([info.smallest_normal * k / 8 for k in range(1, 9)])  # subnormal
    out[3, :8] = -info.smallest_normal * torch.arange(1, 9)
    out[4, :8] = info.tiny * 2.0 ** torch.arange(8, 16)
    out[5, 0] = 4.0
    return out


#: The matrix `_save_planted` plants edge values in, by architecture.
PLANTED = {
    "llama": "model.layers.0.mlp.gate_proj.weight",
    "gpt2": "transformer.h.0.mlp.c_fc.weight",
}


def _save_planted(arch: str, dtype: torch.dtype, out: Path) -> tuple[Path, str]:
    """`_save_half(arch, dtype, out)` with `_plant_edge_values` in its `PLANTED` matrix; the
    checkpoint's path and that matrix's name."""
    source = _save_half(arch, dtype, out)
    tensors = _tensors(source)
    key = PLANTED[arch]
    tensors[key] = _plant_edge_values(tensors[key])
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    return source, key


@pytest.mark.parametrize(("arch", "dtype"), [("llama", torch.bfloat16), ("gpt2", torch.float16)])
def test_zeros_and_subnormals_merge_back_bitwise(
    arch: str, dtype: torch.dtype, tmp_path: Path
) -> None:
    """Exact zeros (the contraction gives ~1e-17, and a sign), negative zeros, subnormal and
    tiny entries, far below the matrix's largest: bitwise after decompose + merge, bfloat16
    Linear and float16 Conv1D (stored transposed) alike; the fixup holds every zero."""
    source, key = _save_planted(arch, dtype, tmp_path / "m")
    tensors = _tensors(source)
    zeros = int((tensors[key] == 0).sum())
    result = mposurgeon.decompose(source, output=tmp_path / "dec")
    records = {m.record.weight_key: m.record for m in result.modules if m.record is not None}
    assert all(rec.rel_error == 0.0 for rec in records.values())
    fixup = records[key].fixup
    assert fixup is not None and fixup.count >= zeros
    mposurgeon.merge(tmp_path / "dec", output=tmp_path / "merged")
    merged = _tensors(tmp_path / "merged")
    assert merged.keys() == tensors.keys()
    assert [k for k, w in tensors.items() if not _bitwise(merged[k], w)] == []


def test_a_fixup_holds_for_other_contractions() -> None:
    """The fixup is made from one float32 contraction, but holds for others of the same cores
    (float64, and float32 in the transposed order, which rounds differently): it also covers
    the entries that contraction rounds right but close to a boundary."""
    generator = torch.Generator().manual_seed(1)
    weight = _plant_edge_values((0.02 * torch.randn(96, 80, generator=generator)).bfloat16())
    shape = plan_shape(96, 80, 4)
    factorized = factorize_weight(weight, "linear", shape, dtype=torch.float32)
    index = rounding_fixup(factorized.matrix, weight, limit=weight.numel())
    assert index is not None
    fixup = Fixup(index, weight.reshape(-1)[index], cores_fingerprint(factorized.cores))
    missed = factorized.matrix.bfloat16().view(torch.int16) != weight.view(torch.int16)
    assert index.numel() > int(missed.sum()) > 0  # more than the misses of this contraction
    transposed = [c.permute(0, 2, 1, 3) for c in factorized.cores]  # the MPO of W^T
    shape_t = MPOShape(80, 96, shape.in_modes, shape.out_modes)
    others = {
        "float32": factorized.matrix,
        "float64": to_matrix([c.double() for c in factorized.cores], shape),
        "transposed": to_matrix(transposed, shape_t).T,
    }
    for name, matrix in others.items():
        rounded = fixup.apply(matrix.to(torch.bfloat16))
        assert _bitwise(rounded, weight), name
    assert not fixup.matches([c * 1.0001 for c in factorized.cores])
    assert fixup.matches([c.clone() for c in factorized.cores])


def test_a_fixup_over_its_limit_keeps_the_misses_and_the_nearest() -> None:
    """An outlier sets the margin of every entry, so that most small entries count as near a
    boundary: over the limit, the fixup keeps every entry this contraction rounds wrong (the
    rounding is then exact) and fills the rest of the limit with those nearest a boundary;
    with more wrong than the limit, there is none."""
    generator = torch.Generator().manual_seed(0)
    weight = _plant_edge_values((0.02 * torch.randn(32, 128, generator=generator)).half())
    factorized = factorize_weight(weight, "linear", plan_shape(32, 128, 5), dtype=torch.float32)
    near = rounding_fixup(factorized.matrix, weight, limit=weight.numel())
    assert near is not None
    missed = factorized.matrix.half().view(torch.int16) != weight.view(torch.int16)
    misses = set(missed.reshape(-1).nonzero().squeeze(1).tolist())
    limit = (len(misses) + near.numel()) // 2
    assert len(misses) < limit < near.numel()  # the margin took in many correct entries
    index = rounding_fixup(factorized.matrix, weight, limit=limit)
    assert index is not None and index.numel() == limit
    assert torch.equal(index, index.unique())  # ascending, no repeats
    assert misses <= set(index.tolist()) <= set(near.tolist())
    kept = Fixup(index, weight.reshape(-1)[index], cores_fingerprint(factorized.cores))
    assert _bitwise(kept.apply(factorized.matrix.half()), weight)
    assert rounding_fixup(factorized.matrix, weight, limit=len(misses) - 1) is None


def test_lossy_decompose_records_the_error_merge_gives(
    half_model: Callable[[str], Path], tmp_path: Path
) -> None:
    """A truncated decompose of bfloat16 weights stores no fixup (it would hold most
    entries), and its rel_error is that of the weight merge writes, rounding included."""
    source = half_model("llama")
    original = _tensors(source)
    mposurgeon.decompose(source, output=tmp_path / "dec", max_bond=4)
    mposurgeon.merge(tmp_path / "dec", output=tmp_path / "merged")
    merged = _tensors(tmp_path / "merged")
    for key, rec in _records(tmp_path / "dec").items():
        assert rec.fixup is None and rec.rel_error is not None
        weight = original[key].double()
        actual = float((merged[key].double() - weight).norm() / weight.norm())
        assert rec.rel_error == pytest.approx(actual, rel=1e-6), key
        assert rec.predicted_error is not None and rec.predicted_error >= rec.rel_error


def test_half_cores_record_their_rounding(
    half_model: Callable[[str], Path], tmp_path: Path
) -> None:
    """`--dtype keep` on bfloat16 weights stores bfloat16 cores and no fixup: the lossless
    decompose is then off by their rounding, and its rel_error (the merged weight's) and
    predicted_error say so (it said 0.0)."""
    source = half_model("llama")
    original = _tensors(source)
    result = mposurgeon.decompose(source, output=tmp_path / "dec", dtype="keep")
    mposurgeon.merge(tmp_path / "dec", output=tmp_path / "merged")
    merged = _tensors(tmp_path / "merged")
    stored = _tensors(tmp_path / "dec")
    assert not [key for key in stored if ".mpo.fixup." in key]
    for planned in result.modules:
        rec = planned.record
        assert rec is not None and stored[rec.core_keys()[0]].dtype == torch.bfloat16
        assert rec.fixup is None  # no fixup can repair rounded cores
        assert rec.predicted_error == rec.rel_error
        assert 5e-4 < rec.predicted_error < 2e-2  # bfloat16 rounding, ~ u = 3.9e-3
        weight = original[rec.weight_key].double()
        actual = float((merged[rec.weight_key].double() - weight).norm() / weight.norm())
        assert rec.rel_error == pytest.approx(actual, rel=1e-6), rec.name  # merge's own


# -- load_model --------------------------------------------------------------------------------


def _mpo_layers(model: torch.nn.Module) -> dict[str, MPOLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MPOLinear)}


def test_load_model_uses_the_weights_merge_writes(llama_dec: Path, llama_merged: Path) -> None:
    """float32 cores of a bfloat16 model: each layer's effective weight (its float32 matrix
    rounded once to the model's dtype, its fixup applied) is bitwise the merged weight, the
    original, and the model's outputs (reconstructing) are bitwise the merged checkpoint's."""
    merged = _tensors(llama_merged)
    model = load_model(llama_dec, forward_mode="reconstruct")
    layers = _mpo_layers(model)
    assert len(layers) == 14
    assert any(layer.mpo.fixup is not None for layer in layers.values())
    for name, layer in layers.items():
        assert layer.mpo.core[0].dtype == torch.float32
        assert _bitwise(layer.weight.to(torch.bfloat16), merged[f"{name}.weight"]), name
    dense = LlamaForCausalLM.from_pretrained(llama_merged).eval()
    assert next(dense.parameters()).dtype == torch.bfloat16
    batch = sample_batch(AutoConfig.from_pretrained(llama_merged))
    assert torch.equal(model_output(model, batch), model_output(dense, batch))


def test_load_model_of_decomposed_half_embeddings(
    half_model: Callable[[str], Path], tmp_path: Path
) -> None:
    """A bfloat16 Llama with its word embeddings (and untied LM head) as float32 cores loads
    and runs: its rows come in the model's dtype (the embeddings' dtype is passed on), and
    reconstructing, its outputs are bitwise the merged checkpoint's."""
    layers = ["embeddings", "lm_head", "FFN_1"]
    mposurgeon.decompose(half_model("llama"), output=tmp_path / "dec", layers=layers)
    mposurgeon.merge(tmp_path / "dec", output=tmp_path / "merged")
    batch = sample_batch(AutoConfig.from_pretrained(tmp_path / "merged"))
    dense = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    model = load_model(tmp_path / "dec")
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, MPOEmbedding) and embedding.dtype == torch.bfloat16
    assert model_output(model, batch).shape == model_output(dense, batch).shape
    exact = load_model(tmp_path / "dec", forward_mode="reconstruct")
    assert torch.equal(model_output(exact, batch), model_output(dense, batch))


def test_a_live_fixup_holds_until_the_cores_change(planted_dec: Path) -> None:
    """An MPO layer keeps its fixup while its cores are the decomposed ones (moved or copied
    included), passes gradients to the cores as if unrounded, and drops the fixup once a core
    changes: the weight is then the new cores' contraction rounded once."""
    stored = _tensors(planted_dec)
    rec = _repaired(planted_dec)
    model = load_model(planted_dec, forward_mode="reconstruct")
    layer = _mpo_layers(model)[rec.name]
    assert layer.mpo.fixup is not None
    assert not _bitwise(layer.weight.to(torch.bfloat16), _rounded_contraction(rec, stored))

    core = layer.mpo.core[1]
    core.data = core.data.clone()  # moved: another tensor, the same values
    assert layer.mpo.fixup is not None
    with torch.enable_grad():
        layer.mpo.matrix().sum().backward()
        plain = [c.detach().clone().requires_grad_() for c in layer.mpo.cores]
        to_matrix(plain, layer.mpo.shape).sum().backward()
    for live, reference in zip(layer.mpo.cores, plain, strict=True):
        assert live.grad is not None and reference.grad is not None
        assert torch.allclose(live.grad, reference.grad)

    with torch.no_grad():
        layer.mpo.core[0].mul_(1.01)  # as an optimizer step changes it
    assert layer.mpo.fixup is None
    own = to_matrix([c.detach() for c in layer.mpo.cores], layer.mpo.shape).to(torch.bfloat16)
    assert _bitwise(layer.weight.detach().to(torch.bfloat16), own)


def test_contracting_rounds_once_within_the_stated_bound(
    llama_dec: Path, llama_merged: Path
) -> None:
    """Contracting x (bfloat16) through float32 cores, the result rounded once, against the
    merged dense layer F.linear(x, W~) with W~ = W rounded to bfloat16 (|W~ - W| <= u|W|):

        |y_contract - y_dense| <= u (|x| |W|^T) + u (|y_contract| + |y_dense|) + 1e-4 (|x| |W|^T)

    (worst case: the weight's rounding, each output's rounding, and float32 accumulation with
    room to spare; u = 2^-8). Reconstructing, the two are bitwise equal (the test above)."""
    u = U[torch.bfloat16]
    merged = _tensors(llama_merged)
    model = load_model(llama_dec, forward_mode="contract")
    generator = torch.Generator().manual_seed(0)
    for name, layer in _mpo_layers(model).items():
        x = torch.randn(8, layer.in_features, generator=generator).to(torch.bfloat16)
        y = layer(x)
        assert y.dtype == torch.bfloat16
        dense = F.linear(x, merged[f"{name}.weight"])
        weight = layer.mpo.matrix()
        size = x.float().abs() @ weight.abs().T
        bound = u * size + u * (y.float().abs() + dense.float().abs()) + 1e-4 * size
        assert bool(((y.float() - dense.float()).abs() <= bound).all()), name


def test_half_cores_contract_in_float32_and_round_once(
    half_model: Callable[[str], Path], tmp_path: Path
) -> None:
    """bfloat16 cores (`--dtype keep`): load_model's weight is the float32 contraction rounded
    once, bitwise what merge writes (chaining bfloat16 products was about twice as far off);
    contracting an input, it computes in float32 and rounds the output once."""
    mposurgeon.decompose(half_model("llama"), output=tmp_path / "dec", dtype="keep")
    mposurgeon.merge(tmp_path / "dec", output=tmp_path / "merged")
    merged = _tensors(tmp_path / "merged")
    generator = torch.Generator().manual_seed(0)
    for name, layer in _mpo_layers(load_model(tmp_path / "dec")).items():
        assert layer.weight.dtype == torch.bfloat16
        assert torch.equal(layer.weight, merged[f"{name}.weight"]), name
        cores = [c.float() for c in layer.mpo.cores]
        exact = to_matrix(cores, layer.mpo.shape)
        chained = to_matrix(layer.mpo.cores, layer.mpo.shape).float()
        assert (layer.weight.float() - exact).norm() < (chained - exact).norm()
        x = torch.randn(8, layer.in_features, generator=generator).to(torch.bfloat16)
        layer.forward_mode = "contract"
        once = apply_mpo(x.float(), cores, layer.mpo.shape).to(torch.bfloat16)
        assert torch.equal(layer(x), once), name


# -- merge --verify ----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_clean_half_merge_passes_verify_with_no_rounding_difference(
    arch: str, half_model: Callable[[str], Path], tmp_path: Path
) -> None:
    """The factorized model evaluates bitwise the weights merge writes: rounding takes none
    of the tolerance, which is far below the old fixed one (bf16: 0.05 + 0.02 * scale)."""
    mposurgeon.decompose(half_model(arch), output=tmp_path / "dec")
    result = mposurgeon.merge(tmp_path / "dec", output=tmp_path / "merged", verify=True)
    comparison = result.comparison
    assert comparison is not None and comparison.ok
    assert comparison.max_abs_diff <= 0.1 * comparison.tolerance
    assert 0 < comparison.tolerance < 1e-4 * comparison.max_abs_value


def test_verify_tolerance_grows_with_unrounded_matrices() -> None:
    """Each matrix the reference holds unrounded adds its rounding (u per entry), in
    quadrature; with none, only float32 evaluation order is allowed for."""
    tol = merge_stage.half_tolerance
    base = tol(torch.bfloat16, 1.0, unrounded=0, products=15, width=64)
    assert base < 1e-4
    one = tol(torch.bfloat16, 1.0, unrounded=1, products=15, width=64)
    four = tol(torch.bfloat16, 1.0, unrounded=4, products=15, width=64)
    assert one - base == pytest.approx(merge_stage.SAFETY * 2.0**-8)
    assert four - base == pytest.approx(2 * (one - base))
    assert tol(torch.float16, 1.0, unrounded=1, products=15, width=64) < one


def _faulty_dense_tensors(target: str) -> Callable[..., dict[str, torch.Tensor]]:
    """merge's `dense_tensors`, but module `target`'s weight comes from cores whose largest
    central-core entry is off by 1% of the matrix's norm (with the other cores orthonormal,
    the weight is then off by exactly that)."""
    real = merge_stage.dense_tensors

    def dense_tensors(
        rec: MPORecord,
        reader: TensorReader,
        dtype: str = "auto",
        *,
        device: torch.device | None = None,
    ) -> dict[str, torch.Tensor]:
        if rec.name != target:
            return real(rec, reader, dtype, device=device)
        cores = [c.float().clone() for c in record_cores(rec, reader)]
        norm = float(dense_weight(rec, cores).norm())
        central = cores[rec.central_index].view(-1)
        central[central.abs().argmax()] += 0.01 * norm
        weight = dense_weight(rec, cores)
        return {rec.weight_key: weight.to(getattr(torch, rec.dtype)).contiguous()}

    return dense_tensors


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_verify_catches_a_core_off_by_one_percent(
    arch: str,
    half_model: Callable[[str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mposurgeon.decompose(half_model(arch), output=tmp_path / "dec")
    target = next(iter(load_artifact(tmp_path / "dec", verify=False).modules))
    monkeypatch.setattr(merge_stage, "dense_tensors", _faulty_dense_tensors(target))
    out = tmp_path / "merged"
    result = run_cli(capsys, "merge", tmp_path / "dec", "-o", out, "--verify")
    assert_one_line_error(result, 3, "merged outputs differ from the factorized model's")
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_float32_embedding_cores_give_rows_in_the_models_dtype(
    half_model: Callable[[str], Path], tmp_path: Path
) -> None:
    """An MPO embedding of float32 cores in a bfloat16 model returns bfloat16 rows: the merged
    table's rows bitwise when reconstructing, within their rounding (one unit in the last
    place) when contracting; `merge --verify` of such an artifact sees no difference."""
    mposurgeon.decompose(half_model("llama"), output=tmp_path / "dec", layers=["embeddings"])
    result = mposurgeon.merge(tmp_path / "dec", output=tmp_path / "merged", verify=True)
    assert result.comparison is not None and result.comparison.max_abs_diff == 0.0
    table = _tensors(tmp_path / "merged")["model.embed_tokens.weight"]
    rec = next(iter(load_artifact(tmp_path / "dec", verify=False).modules.values()))
    assert isinstance(rec, MPORecord)
    stored = _tensors(tmp_path / "dec")
    fixup = record_fixup(rec, stored)
    cores = MPOCores([stored[k] for k in rec.core_keys()], rec.mpo_shape, fixup)
    assert cores.core[0].dtype == torch.float32
    ids = torch.tensor([[0, 5, 17], [3, 3, 250]])
    reconstructed = MPOEmbedding(cores, forward_mode="reconstruct", dtype=torch.bfloat16)(ids)
    assert reconstructed.dtype == torch.bfloat16 and _bitwise(reconstructed, table[ids])
    contracted = MPOEmbedding(cores, forward_mode="contract", dtype=torch.bfloat16)(ids)
    assert contracted.dtype == torch.bfloat16
    diff = (contracted.float() - table[ids].float()).abs()
    assert bool((diff <= 2 * U[torch.bfloat16] * table[ids].float().abs()).all())


# -- stages that write other cores -------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_classifier_dec(
    half_model: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The bfloat16 Llama with a tokenizer, decomposed with default options."""
    source = tmp_path_factory.mktemp("llama-cls") / "m"
    shutil.copytree(half_model("llama"), source)
    build_tiny_tokenizer("llama", source)
    out = source.parent / "dec"
    mposurgeon.decompose(source, output=out)
    return out


def test_trained_cores_merge_to_their_own_contraction(
    llama_classifier_dec: Path, tmp_path: Path
) -> None:
    """Training writes new cores and no fixup or spectra (records and files); the merged
    weights are the trained cores' contraction rounded once, not overwritten by the decomposed
    cores' fixup."""
    before = _records(llama_classifier_dec)
    assert any(rec.fixup is not None for rec in before.values())
    out = tmp_path / "trained"
    mposurgeon.train(
        llama_classifier_dec, output=out, data=TRAIN, mode="lightweight", max_steps=2, lr=1e-2
    )
    trained = _tensors(out)
    assert not [key for key in trained if ".mpo.fixup." in key or ".mpo.spectra" in key]
    records = _records(out)
    assert all(rec.fixup is None and rec.spectra is None for rec in records.values())
    decomposed = _tensors(llama_classifier_dec)
    moved = [
        key for key, rec in records.items()
        if any(not torch.equal(trained[k], decomposed[k]) for k in rec.core_keys())
    ]  # fmt: skip
    assert moved
    mposurgeon.merge(out, output=tmp_path / "merged")
    merged = _tensors(tmp_path / "merged")
    for key, rec in records.items():
        assert _bitwise(merged[key], _rounded_contraction(rec, trained)), key


def test_truncated_cores_merge_to_their_own_contraction(
    llama_classifier_dec: Path, tmp_path: Path
) -> None:
    """Truncated modules drop their fixup and merge to their cut cores' contraction rounded
    once; the modules left as they were keep theirs and merge back bitwise."""
    original = _tensors(llama_classifier_dec.parent / "m")
    before = _records(llama_classifier_dec)
    mposurgeon.truncate(llama_classifier_dec, output=tmp_path / "cut", param_ratio=0.5)
    cut = _tensors(tmp_path / "cut")
    records = _records(tmp_path / "cut")
    mposurgeon.merge(tmp_path / "cut", output=tmp_path / "merged")
    merged = _tensors(tmp_path / "merged")
    changed = [key for key, rec in records.items() if rec.bonds != before[key].bonds]
    assert changed
    assert any(before[key].fixup is not None for key in changed)
    for key in changed:  # a cut module's fixup is dropped, record and tensors
        assert records[key].fixup is None
        assert not any(k.startswith(f"{key}.mpo.fixup.") for k in cut)
    for key, rec in records.items():
        expected = _rounded_contraction(rec, cut) if key in changed else original[key]
        assert _bitwise(merged[key], expected), key


def test_inspect_counts_no_fixup_entry_as_a_parameter(llama_dec: Path) -> None:
    tensors = _tensors(llama_dec)
    records = _records(llama_dec)
    assert any(rec.fixup is not None for rec in records.values())
    assert any(rec.spectra is not None for rec in records.values())
    cores = sum(tensors[k].numel() for rec in records.values() for k in rec.core_keys())
    params = mposurgeon.inspect(llama_dec)["params"]
    derived = sum(
        t.numel() for k, t in tensors.items() if ".mpo.fixup." in k or ".mpo.spectra" in k
    )
    assert (
        params["mpo"] == cores
        and params["total"] == sum(t.numel() for t in tensors.values()) - derived
    )


def test_merge_ignores_a_fixup_made_for_other_cores(planted_dec: Path) -> None:
    """merge applies a module's fixup only to the cores it was made for: with a core changed
    under it (a stage that kept the record), the weight is the cores' own contraction."""
    tensors = _tensors(planted_dec)
    rec = _repaired(planted_dec)
    exact = merge_stage.dense_tensors(rec, tensors)[rec.weight_key]
    changed = dict(tensors)
    first = rec.core_keys()[0]
    changed[first] = tensors[first] * 1.01
    own = merge_stage.dense_tensors(rec, changed)[rec.weight_key]
    assert _bitwise(own, _rounded_contraction(rec, changed))
    assert not _bitwise(exact, _rounded_contraction(rec, tensors))  # the fixup did something


def test_moe_of_an_artifact_with_fixups_is_valid(llama_dec: Path, tmp_path: Path) -> None:
    """moe turns MPO modules into experts: their fixups go with their cores (neither the
    records nor the files keep them); the modules it leaves keep theirs."""
    mposurgeon.moe(llama_dec, output=tmp_path / "moe", experts=2, top_k=1)
    manifest = load_artifact(tmp_path / "moe")  # every tensor owned by a record
    kept = [r for r in manifest.modules.values() if isinstance(r, MPORecord)]
    experts = [r for r in manifest.modules.values() if not isinstance(r, MPORecord)]
    assert experts and all("fixup" not in (r.model_extra or {}) for r in experts)
    assert any(r.fixup is not None for r in kept)


def test_a_missing_fixup_tensor_is_a_damaged_artifact(llama_dec: Path, tmp_path: Path) -> None:
    """The fixup's tensors are the record's: validation finds one missing."""
    shutil.copytree(llama_dec, tmp_path / "dec")
    tensors = _tensors(tmp_path / "dec")
    rec = next(r for r in _records(llama_dec).values() if r.fixup is not None)
    del tensors[rec.fixup_keys()[1]]
    save_file(tensors, tmp_path / "dec" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ArtifactError, match=r"fixup\.value is not in the tensor files"):
        load_artifact(tmp_path / "dec", verify=False)
