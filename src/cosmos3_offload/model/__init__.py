"""Facts about Cosmos3 that hold before any weight exists: towers, weight groups, registered
sizes, resolution tiers, latent geometry and the embedded tokenizer. No torch, no diffusers."""
