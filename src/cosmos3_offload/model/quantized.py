"""Which of Cosmos3's linear layers an FP8 checkpoint stores in FP8 (pure string rules, no torch).

NVIDIA's FP8 releases quantize the 14 linears of every decoder layer: each tower's attention
projections and its MLP. Everything else stays in bf16: `proj_in`/`proj_out`, the time embedder,
the sound and action projections, `lm_head`, the norms and the embeddings (the `ignore` list of
their `quantization_config`). `--quantize fp8` quantizes the same layers.
"""

from __future__ import annotations

import re

_LAYER = re.compile(r"^layers\.\d+\.")
QUANTIZED_LINEARS = (
    "self_attn.to_q",
    "self_attn.to_k",
    "self_attn.to_v",
    "self_attn.to_out",
    "self_attn.add_q_proj",
    "self_attn.add_k_proj",
    "self_attn.add_v_proj",
    "self_attn.to_add_out",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
    "mlp_moe_gen.gate_proj",
    "mlp_moe_gen.up_proj",
    "mlp_moe_gen.down_proj",
)
KEPT_IN_BF16 = "proj_in/proj_out, time embedder, sound and action projections, lm_head, norms, embeddings"


def is_quantized_linear(path: str) -> bool:
    """Whether the linear at module path `path` (e.g. `layers.3.mlp.up_proj`) is one FP8 stores."""
    layer = _LAYER.match(path)
    return layer is not None and path[layer.end() :] in QUANTIZED_LINEARS
