"""Step caches: skip the generator's decoder stack on steps where a cached residual predicts it."""
