"""tokenmill: an LLM inference engine and OpenAI-compatible server on PyTorch."""

from tokenmill.llm import LLM
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
