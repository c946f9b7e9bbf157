"""From a checkpoint folder (or a registered size with random weights) to placed, filled models:
checkpoint validation, weight values, Cosmos3's groups mapped onto the offload engine, and the
sizes the planner needs."""
