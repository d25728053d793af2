"""MPO shapes: automatic factorization, padding, explicit mode specs and their errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mposurgeon.errors import ShapeError
from mposurgeon.mpo import MPOShape, factorize, parse_mode_spec, plan_shape, shape_from_modes


@pytest.mark.parametrize("dim", [384, 768, 1536, 3072, 1024, 2304, 4096])
def test_factorize_without_padding_when_balanced(dim: int) -> None:
    modes = factorize(dim, 5)
    assert len(modes) == 5
    assert math.prod(modes) == dim
    assert max(modes) <= 2 * dim ** (1 / 5)
    assert min(modes) >= 2
    assert modes[2] == max(modes)  # largest mode at the central index


def test_factorize_matches_papers_ffn_modes() -> None:
    assert factorize(3072, 5) == (4, 4, 8, 6, 4)
    assert factorize(768, 5) == (3, 4, 4, 4, 4)


@pytest.mark.parametrize("dim", [30522, 32128, 50257, 11008, 1003])
def test_factorize_pads_dims_with_large_prime_factors(dim: int) -> None:
    modes = factorize(dim, 5)
    size = math.prod(modes)
    assert dim < size <= 1.1 * dim
    assert max(modes) <= 2 * dim ** (1 / 5) + 1e-9
    assert min(modes) >= 2


def test_factorize_pads_to_the_smallest_acceptable_size() -> None:
    modes = factorize(30522, 5)
    size = math.prod(modes)
    assert factorize(size, 5, max_padding=0.0) == modes
    for smaller in range(30522, size):
        with pytest.raises(ShapeError):
            factorize(smaller, 5, max_padding=0.0)


def test_factorize_small_dims_use_unit_modes() -> None:
    assert sorted(factorize(7, 5)) == [1, 1, 1, 1, 7]
    assert math.prod(factorize(12, 5)) == 12 and 1 in factorize(12, 5)
    deep = factorize(768, 15)
    assert len(deep) == 15 and math.prod(deep) == 768 and deep.count(1) >= 1


def test_factorize_refuses_when_nothing_fits() -> None:
    with pytest.raises(ShapeError, match="5087"):
        factorize(5087, 5, max_padding=0.0)  # a prime
    with pytest.raises(ShapeError):
        factorize(0, 5)


def test_plan_shape_and_properties() -> None:
    shape = plan_shape(3072, 768)
    assert shape.out_modes == (4, 4, 8, 6, 4) and shape.in_modes == (3, 4, 4, 4, 4)
    assert shape.num_cores == 5 and shape.central_index == 2
    assert shape.full_bonds() == (1, 12, 192, 384, 16, 1)
    emb = plan_shape(30522, 384)
    assert emb.padded_out >= 30522 and emb.out_padding == emb.padded_out - 30522
    assert emb.in_padding == 0 and emb.padded_in == 384
    assert MPOShape(8, 8, (2, 2, 2, 1), (2, 2, 2, 1)).central_index == 1


def test_full_bonds_formula() -> None:
    shape = MPOShape(30, 22, (2, 3, 5), (2, 3, 4))
    sites = [4, 9, 20]
    expected = tuple(min(math.prod(sites[:k]), math.prod(sites[k:])) for k in range(len(sites) + 1))
    assert shape.full_bonds() == expected == (1, 4, 20, 1)


def test_shape_dict_round_trip_is_json() -> None:
    shape = plan_shape(30522, 384)
    data = json.loads(json.dumps(shape.to_dict()))
    assert data["out_modes"] == list(shape.out_modes)
    assert MPOShape.from_dict(data) == shape


def test_parse_mode_spec() -> None:
    assert parse_mode_spec("4,4,8,6,4x3,4,4,4,4") == ((4, 4, 8, 6, 4), (3, 4, 4, 4, 4))
    assert parse_mode_spec(" 2, 3 X 3,2 ") == ((2, 3), (3, 2))


@pytest.mark.parametrize(
    "spec", ["4,4x4", "4,4,4", "a,4x4,4", "4,4x4,4x4", "0,4x4,4", "", "4,,4x4,4,4"]
)
def test_parse_mode_spec_rejects_malformed(spec: str) -> None:
    with pytest.raises(ShapeError, match="mode spec"):
        parse_mode_spec(spec)


def test_shape_from_modes_errors_name_dims_and_modes() -> None:
    with pytest.raises(ShapeError) as err:
        shape_from_modes(384, 1536, (4, 4, 4), (4, 4, 4))
    assert str(err.value) == "modes 4,4,4 x 4,4,4 give 64x64, which cannot hold a 384x1536 matrix"
    with pytest.raises(ShapeError, match="equal length"):
        shape_from_modes(16, 16, (4, 4), (2, 2, 4))
    with pytest.raises(ShapeError, match=">= 1"):
        shape_from_modes(16, 16, (16, 0), (4, 4))
    with pytest.raises(ShapeError, match="pads a 100x16 matrix"):
        shape_from_modes(100, 16, (8, 16), (4, 4))
    shape = shape_from_modes(100, 16, (8, 13), (4, 4))  # 4% padding is fine
    assert shape.out_padding == 4


def test_check_cores() -> None:
    shape = MPOShape(6, 4, (2, 3), (2, 2))
    shape.check_cores([torch.zeros(1, 2, 2, 4), torch.zeros(4, 3, 2, 1)])
    with pytest.raises(ShapeError, match="2,3 x 2,2"):
        shape.check_cores([torch.zeros(1, 3, 2, 4), torch.zeros(4, 2, 2, 1)])
