"""The embedded tokenizer has what Cosmos3's prompt templates need."""

from __future__ import annotations

from cosmos3_offload.model.specs import model_spec
from cosmos3_offload.model.tiny_tokenizer import build_tiny_tokenizer


def test_round_trips_any_text_and_fits_the_tiny_vocabulary():
    """Byte-level: any unicode text decodes back to itself; ids stay below the tiny model's vocab size."""
    tok = build_tiny_tokenizer()
    text = "A café at dusk — 東京, 24 fps."
    ids = tok(text).input_ids
    assert tok.decode(ids) == text
    assert max(ids) < len(tok) == model_spec("tiny").transformer["vocab_size"]


def test_chat_template_and_special_tokens(pipeline):
    """tokenize_prompt wraps the prompt in the chat template and ends with eos then <|vision_start|>."""
    tok = pipeline.text_tokenizer
    cond, uncond = pipeline.tokenize_prompt("a fox", "blurry", num_frames=5, height=192, width=320)
    assert cond[-2:] == [tok.eos_token_id, tok.convert_tokens_to_ids("<|vision_start|>")]
    text = tok.decode(cond)
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>user\na fox. The video is" in text
    assert "is not of 192x320 resolution" in tok.decode(uncond)
