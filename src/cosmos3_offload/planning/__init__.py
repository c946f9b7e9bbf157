"""The memory plan as a value and the planner that picks one: pure arithmetic over sizes,
request shapes and a budget. Imports no torch and no diffusers, so it can be reasoned about and
tested without a model."""
