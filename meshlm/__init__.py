"""meshlm: distributed multi-GPU, multi-node LLM inference launched with MPI."""
from meshlm.sampling_params import BeamSearchParams, SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "BeamSearchParams", "RequestOutput", "CompletionOutput"]


def __getattr__(name):  # import torch-heavy parts on first use
    if name == "LLM":
        from meshlm.api.llm import LLM
        return LLM
    if name in ("RequestOutput", "CompletionOutput"):
        from meshlm.engine import outputs
        return getattr(outputs, name)
    raise AttributeError(name)
