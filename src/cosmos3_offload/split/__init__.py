"""The split forward of `Cosmos3OmniTransformer`: a reasoner prefill and a generator-only denoise.
Math only: tensors in, tensors out; where weights live is the offload engine's business."""
