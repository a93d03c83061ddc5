"""RoPE settings from a Hugging Face config: transformers 5's ``rope_parameters`` or 4.x's
``rope_theta`` and ``rope_scaling``, per layer type where a model has one per type (Gemma 3)."""

from transformers import PretrainedConfig

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope", "yarn")


def rope_layer_types(config: PretrainedConfig) -> list[str]:
    """The layer types with a RoPE of their own (Gemma 3's "sliding_attention" and
    "full_attention"); none where one RoPE serves every layer."""
    return [name for name, value in (getattr(config, "rope_parameters", None) or {}).items() if isinstance(value, dict)]


def rope_dict(config: PretrainedConfig, layer_type: str | None) -> dict:
    """The config's ``rope_parameters`` (a copy), the ``layer_type``'s where it has one per type."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    return params


def rope_parameters(config: PretrainedConfig, layer_type: str | None = None) -> tuple[float, dict]:
    """(rope_theta, scaling dict) from a transformers 5 ``rope_parameters`` or a 4.x config. Configs
    with a RoPE per layer type (Gemma 3: ``{"sliding_attention": {...}, "full_attention": {...}}``)
    give the ``layer_type``'s."""
    params = rope_dict(config, layer_type)
    theta = params.pop("rope_theta", None) or getattr(config, "rope_theta", None) or 10000.0
    scaling = params or dict(getattr(config, "rope_scaling", None) or {})
    scaling.pop("partial_rotary_factor", None)  # a model that supports it reads it from its config
    scaling.setdefault("rope_type", scaling.pop("type", "default"))
    if (scaling["rope_type"] in ("llama3", "yarn", "longrope") and layer_type not in rope_layer_types(config)
            and hasattr(config, "original_max_position_embeddings")):
        # The config's own field wins over the one in its rope parameters (Phi-3 keeps it there), as
        # transformers' standardize_rope_params gives it when it builds the model (found by a hunt:
        # a Llama's top-level field beside a yarn rope_scaling was not read, and every position
        # after the first had other logits).
        scaling["original_max_position_embeddings"] = config.original_max_position_embeddings
    scaling.setdefault("original_max_position_embeddings", getattr(config, "original_max_position_embeddings", None))
    if scaling["rope_type"] not in SUPPORTED_ROPE_TYPES:
        where = f" of the {layer_type} layers" if layer_type else ""
        raise ValueError(f"rope_type {scaling['rope_type']!r}{where} (rope_parameters / rope_scaling) is not supported; "
                         f"supported: {SUPPORTED_ROPE_TYPES}.")
    if scaling["rope_type"] == "yarn":
        if scaling.get("factor") is None:
            # transformers' reading (DeepSeek-V3's configs): the ratio of the two lengths.
            scaling["factor"] = config.max_position_embeddings / scaling["original_max_position_embeddings"]
        if layer_type in rope_layer_types(config):
            # transformers reads "truncate" from the top level of rope_parameters, never a layer type's.
            scaling["truncate"] = config.rope_parameters.get("truncate", True)
    return float(theta), scaling
