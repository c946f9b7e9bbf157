"""cosmos3-offload: Cosmos3 omni video generation with the reasoner run once per prompt.

The public API: `GenerationConfig` says what to generate, `run` does it and returns a report;
`prefill` and `denoise` are the split halves of diffusers' `Cosmos3OmniTransformer.forward`.

The package is layered, and imports only go down (tests/test_layering.py checks it):

- `errors`, `units`, `caches`: the base every layer may use;
- `model`: facts about Cosmos3 (towers, weight groups, sizes, tiers, latent geometry, tokenizer);
- `planning`: the plan value and the planner, pure arithmetic (no torch);
- `offload`: the generic engine (host slabs, arena, streams, placements), no Cosmos3;
- `kernels`: which attention and fused elementwise kernels the split math runs (probed per GPU);
- `parallel`: the process groups of several GPUs and the exchanges the split makes over them;
- `split`: the prefill/denoise math, no devices;
- `stepcache`: SeaCache's gate over the generator's decoder stack;
- `vae`: the tiled decode and the conditioning encode;
- `loading`: checkpoints and weights into the engine's homes;
- `app`: the request, the run, inputs and outputs, the CLI;
- `serve`: the HTTP server (an OpenAI-style job API and a web page) over one loaded model;
- `integration`: `enable(pipe, ...)`, our split and placement inside a diffusers `Cosmos3OmniPipeline`;
- `main`: the console script, dispatching to the CLI and the server.

Names are resolved on first use, so importing a lower layer (say `planning`) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GenerationConfig": "app.config",
    "GeneratorInputs": "split.denoise",
    "GeneratorLayout": "split.denoise",
    "GeneratorPrediction": "split.denoise",
    "InputError": "errors",
    "ReasonerMemory": "split.prefill",
    "RunReport": "app.runner",
    "denoise": "split.denoise",
    "enable": "integration.diffusers_pipeline",
    "prefill": "split.prefill",
    "run": "app.runner",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
