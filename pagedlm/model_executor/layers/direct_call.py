"""Calls of pagedlm's model modules go straight to ``forward``."""


class DirectCall:
    """Mixin for an ``nn.Module`` (listed before it in the bases): calling the module calls
    ``self.forward`` (an instance's own ``forward``, if one was set, included), without
    ``nn.Module.__call__``'s hook and tracing checks. A model step makes ~12 module calls a layer;
    skipping those checks saved ~0.3 ms of a 30-layer step (docs/performance.md, session 21).

    Raises ``NotImplementedError`` on registering a module hook, which would never run; wrap
    ``forward`` instead (before the first ``generate``: recorded decode steps replay the model as it
    was, ``worker/step_graph.py``). What else lives in ``nn.Module.__call__`` does not run on these modules
    either: torch's global module hooks (``register_module_forward_hook``), ``torch.profiler``'s
    module ranges (``with_modules=True``; ``benchmarks/profile_decode.py`` wraps ``forward`` in
    ``record_function`` instead), ``Module.compile()``.
    """

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def _hooks_never_run(self, *args, **kwargs):
        raise NotImplementedError(
            f"{type(self).__name__} is called without nn.Module hooks (pagedlm's model modules call forward "
            "directly); wrap its forward instead"
        )

    register_forward_pre_hook = register_forward_hook = _hooks_never_run
    register_full_backward_pre_hook = register_full_backward_hook = register_backward_hook = _hooks_never_run
