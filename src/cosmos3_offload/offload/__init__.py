"""The offload engine, generic over `nn.Module` weight groups: host slabs, the device arena,
copies and events, and the resident, staged and streamed placements. Knows nothing of Cosmos3."""
