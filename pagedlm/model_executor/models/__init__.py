from torch import nn
from transformers import PretrainedConfig

from pagedlm.model_executor.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3ForConditionalGeneration
from pagedlm.model_executor.models.llama import (
    GraniteForCausalLM, LlamaForCausalLM, MistralForCausalLM, Phi3ForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM,
)

_MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "GraniteForCausalLM": GraniteForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Gemma3ForConditionalGeneration": Gemma3ForConditionalGeneration,  # its language model
}


def get_model_class(config: PretrainedConfig) -> type[nn.Module]:
    for arch in getattr(config, "architectures", None) or []:
        if arch in _MODELS:
            return _MODELS[arch]
    raise ValueError(
        f"Model architectures {getattr(config, 'architectures', None)} are not supported; "
        f"supported architectures: {', '.join(_MODELS)}."
    )
