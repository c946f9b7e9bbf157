"""cosmos3-offload: Cosmos3 omni video generation with the reasoner run once per prompt.

The public API: `GenerationConfig` says what to generate, `run` does it and returns a report;
`prefill` and `denoise` are the split halves of diffusers' `Cosmos3OmniTransformer.forward`.
"""

from .config import GenerationConfig
from .denoise import GeneratorInputs, GeneratorLayout, GeneratorPrediction, denoise
from .errors import InputError
from .prefill import ReasonerMemory, prefill
from .runner import RunReport, run

__all__ = [
    "GenerationConfig",
    "GeneratorInputs",
    "GeneratorLayout",
    "GeneratorPrediction",
    "InputError",
    "ReasonerMemory",
    "RunReport",
    "denoise",
    "prefill",
    "run",
]
