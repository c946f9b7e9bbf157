"""A request, declared once: every field's type, default, bounds, unit, help text and its name at each
door (the CLI's flags, cosmos-framework's sample files, the HTTP API, diffusers' call keywords).

No torch here: the flags, the sample files and the server's fields are derived from this layer, and
each door refuses a bad value with the same words (see `spec.RequestSpec` and `field.FieldSpec`).
"""
