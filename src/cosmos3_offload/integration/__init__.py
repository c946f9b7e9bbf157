"""Our split and placement inside a diffusers `Cosmos3OmniPipeline`: `enable(pipe, vram_budget=...)`.

- `diffusers_pipeline`: `enable`, which checks the pipeline, picks the plan and places its weights;
- `budget`: the plan for a budget, chosen for the largest call the user declares, and each call's check;
- `fp8`: the transformer's linears rounded to FP8 as they are placed (`quantize="fp8"`);
- `pipeline_weights`: the pipeline's own modules placed as the plan says, their old tensors freed;
- `state`: what `enable` set up, kept on the pipeline as `pipe.offload`;
- `offloaded_pipeline`: the placed pipeline's class, whose `__call__` takes diffusers' arguments;
- `call`: those arguments (an `action=CosmosActionCondition` included) read into one call's values, and
  what cannot be honoured refused;
- `generation`: one call through the generation path (app/generation_path.py's `generate`, the CLI's own),
  returned as diffusers returns it.
"""
