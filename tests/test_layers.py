"""MPO layers: both forward evaluations equal the dense module they replace."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from mposurgeon.models.layers import MPOCores, MPOEmbedding, MPOLinear
from mposurgeon.models.orientation import as_matrix
from mposurgeon.models.surgery import MPOModuleState, install_mpo_layers
from mposurgeon.mpo.decomposition import decompose
from mposurgeon.mpo.shapes import plan_shape


def _cores(weight: torch.Tensor, num_cores: int = 4) -> MPOCores:
    shape = plan_shape(weight.shape[0], weight.shape[1], num_cores)
    return MPOCores(decompose(weight, shape).cores, shape)


@pytest.mark.parametrize("mode", ["reconstruct", "contract", "auto"])
def test_mpo_linear_equals_dense_linear(mode: str) -> None:
    torch.manual_seed(0)
    dense = nn.Linear(48, 40, dtype=torch.float64)
    layer = MPOLinear(_cores(dense.weight.detach()), dense.bias.detach().clone(), forward_mode=mode)
    x = torch.randn(3, 5, 48, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-10, atol=1e-10)


def test_forward_modes_agree_and_auto_picks_by_flops() -> None:
    torch.manual_seed(1)
    weight = torch.randn(64, 96, dtype=torch.float64)
    cores = _cores(weight, 5)
    rec = MPOLinear(cores, forward_mode="reconstruct")
    con = MPOLinear(cores, forward_mode="contract")
    auto = MPOLinear(cores)
    for batch in (1, 4096):
        x = torch.randn(batch, 96, dtype=torch.float64)
        torch.testing.assert_close(rec(x), con(x), rtol=1e-10, atol=1e-10)
    # A single row is cheaper to push through the cores than to rebuild a lossless weight;
    # a big batch is cheaper with one rebuilt weight and a dense matmul.
    assert auto.chosen_mode(1) == "contract"
    assert auto.chosen_mode(4096) == "reconstruct"


def test_gradients_reach_every_core_in_both_modes() -> None:
    torch.manual_seed(2)
    cores = _cores(torch.randn(32, 32), 4)
    for mode in ("reconstruct", "contract"):
        layer = MPOLinear(cores, forward_mode=mode)
        layer.zero_grad()
        layer(torch.randn(8, 32)).square().sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cores.core)


@pytest.mark.parametrize("mode", ["reconstruct", "contract"])
def test_mpo_embedding_equals_dense_embedding_with_padding(mode: str) -> None:
    torch.manual_seed(3)
    dense = nn.Embedding(1003, 24, dtype=torch.float64)  # 1003 = 17 * 59 needs padding
    layer = MPOEmbedding(_cores(dense.weight.detach()), forward_mode=mode)
    ids = torch.tensor([[0, 5, 1002], [17, 59, 1000]])
    torch.testing.assert_close(layer(ids), dense(ids), rtol=1e-10, atol=1e-10)


def test_state_dict_keys_are_artifact_names() -> None:
    layer = MPOLinear(_cores(torch.randn(16, 16), 3), torch.zeros(16))
    assert sorted(layer.state_dict()) == ["bias", "mpo.core.0", "mpo.core.1", "mpo.core.2"]


def test_install_replaces_conv1d_and_ties_shared_cores() -> None:
    torch.manual_seed(4)
    model = nn.Module()
    model.wte = nn.Embedding(50, 16, dtype=torch.float64)
    model.lm_head = nn.Linear(16, 50, bias=False, dtype=torch.float64)
    model.lm_head.weight = model.wte.weight
    model.c_fc = Conv1D(32, 16).double()  # stores (in, out) = (16, 32)
    x = torch.randn(2, 16, dtype=torch.float64)
    ids = torch.tensor([1, 2, 49])
    expected = (model.wte(ids), model.lm_head(x), model.c_fc(x))
    emb = _cores(model.wte.weight.detach())
    fc = _cores(as_matrix(model.c_fc.weight.detach(), "conv1d"))
    states = [
        MPOModuleState("wte", "embedding", emb.shape, emb.cores, tied_names=("lm_head",)),
        MPOModuleState("c_fc", "conv1d", fc.shape, fc.cores),
    ]
    installed = install_mpo_layers(model, states)
    assert set(installed) == {"wte", "lm_head", "c_fc"}
    assert model.lm_head.mpo is model.wte.mpo  # tied: one set of cores
    torch.testing.assert_close(model.wte(ids), expected[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(model.lm_head(x), expected[1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(model.c_fc(x), expected[2], rtol=1e-10, atol=1e-10)
