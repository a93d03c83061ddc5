from torch import nn
from transformers import PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from pagedlm.model_executor.models.gemma import (
    Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3ForConditionalGeneration, GemmaForCausalLM,
)
from pagedlm.model_executor.models.llama import (
    GraniteForCausalLM, LlamaForCausalLM, Ministral3ForCausalLM, Mistral3ForConditionalGeneration, MistralForCausalLM,
    Phi3ForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, SmolLM3ForCausalLM,
)
from pagedlm.model_executor.models.olmo import Olmo2ForCausalLM, Olmo3ForCausalLM

_MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "MinistralForCausalLM": MistralForCausalLM,  # Mistral with layer_types (config.get_sliding_window)
    "Ministral3ForCausalLM": Ministral3ForCausalLM,
    "Mistral3ForConditionalGeneration": Mistral3ForConditionalGeneration,  # its language model
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "GraniteForCausalLM": GraniteForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "SmolLM3ForCausalLM": SmolLM3ForCausalLM,
    "Olmo2ForCausalLM": Olmo2ForCausalLM,
    "Olmo3ForCausalLM": Olmo3ForCausalLM,
    "GemmaForCausalLM": GemmaForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Gemma3ForConditionalGeneration": Gemma3ForConditionalGeneration,  # its language model
}


def get_model_class(config: PretrainedConfig) -> type[nn.Module]:
    """The model of the config's ``architectures``; without them, the one transformers'
    ``AutoModelForCausalLM`` takes for its ``model_type``."""
    archs = getattr(config, "architectures", None) or [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)]
    for arch in archs:
        if arch in _MODELS:
            model_cls = _MODELS[arch]
            # A multimodal checkpoint's language model: config is its text config.
            text_model_types = getattr(model_cls, "text_model_types", None)
            if text_model_types is not None and config.model_type not in text_model_types:
                raise ValueError(f"{arch} with a text config of model_type {config.model_type!r} is not supported; "
                                 f"supported: {', '.join(map(repr, text_model_types))}.")
            return model_cls
    raise ValueError(
        f"Model architectures {getattr(config, 'architectures', None)} (model_type {config.model_type!r}) are not "
        f"supported; supported architectures: {', '.join(_MODELS)}."
    )
