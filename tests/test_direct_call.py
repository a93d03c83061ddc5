"""pagedlm's model modules are called without nn.Module's hook machinery (DirectCall)."""

import pytest
import torch
from torch import nn

from pagedlm.config import ModelConfig
from pagedlm.model_executor.layers.direct_call import DirectCall
from pagedlm.model_executor.layers.layernorm import RMSNorm
from pagedlm.model_executor.model_loader import get_model


def test_every_called_module_of_a_model_calls_forward_directly(model_dir):
    model = get_model(ModelConfig.create(model_dir, "float32", None, "cpu"))
    containers = (nn.ModuleList, nn.ModuleDict, nn.Sequential)  # iterated by their owners, never called
    plain = [name for name, m in model.named_modules() if not isinstance(m, (DirectCall, *containers))]
    assert not plain, f"modules called through nn.Module.__call__: {plain}"


def test_a_call_runs_the_instance_forward_and_a_hook_is_refused():
    norm = RMSNorm(32, eps=1e-6)
    x = torch.randn(3, 32)
    expected = norm.forward(x)
    calls = []
    forward = norm.forward
    norm.forward = lambda *args: calls.append(args) or forward(*args)  # how the profiling benchmarks wrap a layer
    assert torch.equal(norm(x), expected) and len(calls) == 1
    for register in (norm.register_forward_hook, norm.register_forward_pre_hook, norm.register_full_backward_hook):
        with pytest.raises(NotImplementedError, match="RMSNorm is called without nn.Module hooks"):
            register(lambda *args: None)
