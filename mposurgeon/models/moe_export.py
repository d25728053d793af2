"""The `transformers` mixture-of-experts checkpoint an MPOE model becomes (`merge`).

An MPOE model (`models/moe.py`) of a Llama-family model is a Mixtral, and one of a T5 (relu or
gelu, not gated) is a Switch Transformers model, when every layer's feed-forward block is a
mixture (neither class has dense layers among sparse ones) and the gates are the class's:
Mixtral's softmax over all experts, top-k, renormalized over the k (`normalized`); Switch's
top-1 expert weighted by its probability (`switch`). Both route every token in evaluation:
Switch's `expert_capacity` is set so high that no token is ever dropped (HF counts a token's
priority per sequence).

Names in the files, for expert e (the layout `save_pretrained` of transformers 5 writes, which
transformers 4 reads too; transformers 5 fuses Mixtral's experts when it loads them):
- Mixtral: `<layer>.block_sparse_moe.experts.<e>.w1.weight` (gate_proj, (d_ff, d_model)),
  `.w3.weight` (up_proj), `.w2.weight` (down_proj, (d_model, d_ff)); the router
  `<layer>.block_sparse_moe.gate.weight` (E, d_model), `<layer>` e.g. `model.layers.0`.
- Switch Transformers: `<ff>.mlp.experts.expert_<e>.wi.weight` / `.wo.weight`; the router
  `<ff>.mlp.router.classifier.weight` (E, d_model), `<ff>` e.g. `encoder.block.0.layer.1`.
Every other tensor keeps its name.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mposurgeon.errors import UsageError
from mposurgeon.models.groups import select_targets
from mposurgeon.models.layout import ModelLayout

if TYPE_CHECKING:
    from transformers import PretrainedConfig

#: Switch Transformers' `expert_capacity`: tokens an expert takes per sequence, never reached.
NEVER_DROP = 2**31 - 1
#: Config keys that are the run's, not the model's: never carried to the new config.
_NOT_CARRIED = {"model_type", "architectures", "transformers_version", "_name_or_path"}
_LOAD_HINT = "run the artifact with `mposurgeon.load_model(ARTIFACT)`"


@dataclass(frozen=True)
class MoESpec:
    """The routing of an MPOE matrix: `experts` E, `top_k` experts per token, its `gate`."""

    experts: int
    top_k: int
    gate: str


@dataclass(frozen=True)
class MoEFamily:
    """A `transformers` MoE class and the dense models it holds."""

    name: str
    prefix: str  # of its classes: MixtralForCausalLM
    sources: Mapping[str, str]  # dense model type -> its classes' prefix
    matrix: re.Pattern[str]  # an FFN matrix (file name): groups `block`, `proj`
    router: re.Pattern[str]  # an MPOE router module (file name): group `block`
    projections: Mapping[str, str]  # dense projection -> the expert's
    expert_key: str  # format of an expert's weight: block, e, proj
    router_key: str  # format of the router's weight: block


MIXTRAL = MoEFamily(
    name="Mixtral",
    prefix="Mixtral",
    sources={"llama": "Llama", "mistral": "Mistral"},
    matrix=re.compile(
        r"(?P<block>(?:.+\.)?layers\.\d+\.)mlp\.(?P<proj>gate_proj|up_proj|down_proj)"
    ),
    router=re.compile(r"(?P<block>(?:.+\.)?layers\.\d+\.)mlp\.mpoe_router"),
    projections={"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"},
    expert_key="{block}block_sparse_moe.experts.{e}.{proj}.weight",
    router_key="{block}block_sparse_moe.gate.weight",
)
SWITCH = MoEFamily(
    name="Switch Transformers",
    prefix="SwitchTransformers",
    sources={"t5": "T5"},
    matrix=re.compile(r"(?P<block>.+\.layer\.\d+\.)DenseReluDense\.(?P<proj>wi|wo)"),
    router=re.compile(r"(?P<block>.+\.layer\.\d+\.)DenseReluDense\.mpoe_router"),
    projections={"wi": "wi", "wo": "wo"},
    expert_key="{block}mlp.experts.expert_{e}.{proj}.weight",
    router_key="{block}mlp.router.classifier.weight",
)
_FAMILIES = (MIXTRAL, SWITCH)


@dataclass(frozen=True)
class MoEExport:
    """The MoE checkpoint of an MPOE model: its `config` (`architectures` set) and the names
    its files give the experts and routers (module doc)."""

    family: MoEFamily
    config: PretrainedConfig

    @property
    def architecture(self) -> str:
        return str(self.config.architectures[0])

    def expert_key(self, matrix: str, expert: int) -> str:
        """The name of expert `expert`'s weight of FFN matrix `matrix` (a file module name)."""
        match = self.family.matrix.fullmatch(matrix)
        if match is None:
            raise KeyError(f"{matrix} is not a feed-forward matrix of a {self.family.name} layer")
        proj = self.family.projections[match["proj"]]
        return self.family.expert_key.format(block=match["block"], e=expert, proj=proj)

    def router_key(self, router: str) -> str:
        """The name of the weight of MPOE router module `router` (`<block>.mpoe_router`)."""
        match = self.family.router.fullmatch(router)
        if match is None:
            raise KeyError(f"{router} is not the router of a {self.family.name} layer")
        return self.family.router_key.format(block=match["block"])


def moe_family(config: PretrainedConfig) -> MoEFamily | None:
    """The MoE class family of a dense model's config, or None where transformers has none."""
    return next((f for f in _FAMILIES if config.model_type in f.sources), None)


def moe_export(
    layout: ModelLayout,
    file_keys: Collection[str],
    config: PretrainedConfig,
    matrices: Mapping[str, MoESpec],
) -> MoEExport | None:
    """The MoE checkpoint of the dense model `config` (layout `layout`, files `file_keys`)
    whose FFN `matrices` (file module names) are MPOE ones; None where transformers has no
    MoE class for the architecture. Raises a one-line `UsageError` where the model is not
    one of the class's: a dense FFN left, gates or options the class cannot compute."""
    family = moe_family(config)
    if family is None:
        return None
    spec = _one_spec(matrices)
    if family is MIXTRAL:
        overrides = _mixtral_options(config, spec)
    else:
        overrides = _switch_options(config, spec)
    _check_every_layer(family, layout, file_keys, matrices)
    architecture = _architecture(family, config)
    target = _target_config(family, config, {**overrides, "architectures": [architecture]})
    return MoEExport(family, target)


def _one_spec(matrices: Mapping[str, MoESpec]) -> MoESpec:
    """The routing all `matrices` share (an MoE class's config holds one)."""
    first, *rest = matrices.items()
    other = next((name for name, spec in rest if spec != first[1]), None)
    if other is not None:
        raise UsageError(
            f"{other} routes unlike {first[0]} (experts, top-k or gates differ), and an MoE "
            "checkpoint holds one routing for all its layers",
            hint=_LOAD_HINT,
        )
    return first[1]


def _mixtral_options(config: PretrainedConfig, spec: MoESpec) -> dict[str, Any]:
    """MixtralConfig's MoE fields; refuse what Mixtral cannot compute."""
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise UsageError(
                f"this {config.model_type} model has {flag} true, and Mixtral layers have no "
                "biases, so its mixture of experts has no Mixtral checkpoint",
                hint=_LOAD_HINT,
            )
    if spec.gate != "normalized":
        raise UsageError(
            f"its mixture of experts has {spec.gate} gates, and Mixtral weights the top-k "
            "experts by their probabilities renormalized over the k (normalized gates)",
            hint="upcycle with --gate normalized (the default for Llama), or " + _LOAD_HINT,
        )
    return {
        "num_local_experts": spec.experts,
        "num_experts_per_tok": spec.top_k,
        "router_jitter_noise": 0.0,
        "output_router_logits": False,
    }


def _switch_options(config: PretrainedConfig, spec: MoESpec) -> dict[str, Any]:
    """SwitchTransformersConfig's MoE fields; refuse what Switch Transformers cannot
    compute."""
    if getattr(config, "is_gated_act", False):
        raise UsageError(
            f"this T5 has a gated feed-forward (feed_forward_proj {config.feed_forward_proj!r}: "
            "wi_0, wi_1), and Switch Transformers experts are not gated",
            hint=_LOAD_HINT,
        )
    if not getattr(config, "scale_decoder_outputs", True):
        raise UsageError(
            "this T5 does not scale its decoder output before the LM head (tie_word_embeddings "
            "false), and Switch Transformers does",
            hint=_LOAD_HINT,
        )
    if spec.gate != "switch" or spec.top_k != 1:
        raise UsageError(
            f"its mixture of experts has top-k {spec.top_k} {spec.gate} gates, and Switch "
            "Transformers sends each token to its top-1 expert weighted by its probability",
            hint="upcycle T5 with the defaults (--top-k 1, switch gates), or " + _LOAD_HINT,
        )
    return {
        "num_experts": spec.experts,
        "expert_capacity": NEVER_DROP,
        "num_sparse_encoder_layers": config.num_layers,
        "num_sparse_decoder_layers": config.num_decoder_layers,
        "router_bias": False,
        "router_jitter_noise": 0.0,
        "router_dtype": "float32",
        "router_ignore_padding_tokens": False,
        "add_router_probs": False,
        "tie_word_embeddings": True,
    }


def _check_every_layer(
    family: MoEFamily,
    layout: ModelLayout,
    file_keys: Collection[str],
    matrices: Mapping[str, MoESpec],
) -> None:
    """Every FFN matrix of the model is an MPOE matrix, and every MPOE matrix one of the
    class's FFN matrices: an MoE class makes every layer's FFN a mixture."""
    ffn = [t.name for t in select_targets(layout, file_keys, layers=["FFN_1", "FFN_2"])]
    dense = [name for name in ffn if name not in matrices]
    if dense:
        more = f" (and {len(dense) - 1} more)" if len(dense) > 1 else ""
        raise UsageError(
            f"{dense[0]}{more} is a dense feed-forward matrix, and {family.name} makes every "
            "layer's feed-forward block a mixture of experts",
            hint="upcycle every FFN matrix (mposurgeon moe BASE with the default --layers), "
            "or " + _LOAD_HINT,
        )
    odd = [name for name in matrices if family.matrix.fullmatch(name) is None]
    if odd:
        raise UsageError(
            f"{odd[0]} is a mixture of experts, and {family.name} has experts only in the "
            "feed-forward blocks",
            hint=_LOAD_HINT,
        )


def _architecture(family: MoEFamily, config: PretrainedConfig) -> str:
    """The MoE class for the dense model's head: LlamaForCausalLM -> MixtralForCausalLM."""
    import transformers

    source = family.sources[config.model_type]
    archs = list(getattr(config, "architectures", None) or [f"{source}Model"])
    dense = archs[0]
    target = family.prefix + dense.removeprefix(source) if dense.startswith(source) else None
    if target is None or not hasattr(transformers, target):
        raise UsageError(
            f"{dense} has no {family.name} counterpart in transformers"
            + (f" ({target})" if target else ""),
            hint=_LOAD_HINT,
        )
    return target


def _target_config(
    family: MoEFamily, config: PretrainedConfig, overrides: Mapping[str, Any]
) -> PretrainedConfig:
    """The MoE class's config: every field of the dense `config` the MoE config has too
    (sizes, norms, rope, vocabulary, labels, special tokens...), then `overrides`. The dense
    model's own fields are dropped: the `_options` functions checked them."""
    import transformers

    target_class = getattr(transformers, f"{family.prefix}Config")
    own = set(type(config)().to_dict()) - set(target_class().to_dict())
    carried = {k: v for k, v in config.to_dict().items() if k not in own and k not in _NOT_CARRIED}
    return target_class(**{**carried, **overrides})
