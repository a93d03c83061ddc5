"""pagedlm: offline batch inference for LLMs with continuous batching over a paged KV cache."""

# Before anything imports torch: libgomp reads its environment once, when torch loads it.
from pagedlm.openmp import set_openmp_defaults

set_openmp_defaults()

# First: tqdm.auto picks the notebook's progress bar once, when first imported (transformers
# imports it too), and this import keeps its warning about a missing ipywidgets quiet.
import pagedlm.entrypoints.progress_bar  # noqa: E402, F401, I001
from pagedlm.logger import init_logger  # noqa: E402

init_logger()

from pagedlm.entrypoints.llm import LLM  # noqa: E402
from pagedlm.inputs import PromptType, TextPrompt, TokensPrompt  # noqa: E402
from pagedlm.outputs import BeamSearchOutput, BeamSearchSequence, CompletionOutput, RequestOutput  # noqa: E402
from pagedlm.sampling_params import BeamSearchParams, SamplingParams, StructuredOutputsParams  # noqa: E402
from pagedlm.transformers_utils.gguf import default_model_path  # noqa: E402
from pagedlm.openmp import initialize_vector_math, restore_environment  # noqa: E402

restore_environment()  # libgomp has read it by now; child processes do not inherit it
initialize_vector_math()

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "BeamSearchParams", "TextPrompt", "TokensPrompt", "PromptType",
           "RequestOutput", "CompletionOutput", "BeamSearchOutput", "BeamSearchSequence", "default_model_path"]
__version__ = "0.1.0"
