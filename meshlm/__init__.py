"""meshlm: distributed multi-GPU, multi-node LLM inference launched with MPI."""
from meshlm.sampling_params import BeamSearchParams, SamplingParams
from meshlm.structured_outputs import StructuredOutputsParams

__version__ = "0.1.0"
__all__ = ["LLM", "AsyncLLM", "EngineArgs", "SamplingParams", "BeamSearchParams", "StructuredOutputsParams",
           "RequestOutput", "CompletionOutput"]


def __getattr__(name):  # import torch-heavy parts on first use
    if name == "LLM":
        from meshlm.api.llm import LLM
        return LLM
    if name == "AsyncLLM":
        from meshlm.api.async_llm import AsyncLLM
        return AsyncLLM
    if name == "EngineArgs":
        from meshlm.config import EngineArgs
        return EngineArgs
    if name in ("RequestOutput", "CompletionOutput"):
        from meshlm.engine import outputs
        return getattr(outputs, name)
    raise AttributeError(name)
