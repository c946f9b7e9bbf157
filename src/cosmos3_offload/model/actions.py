"""Cosmos3's action modes and embodiments: the registry the request, the planner and the doors check
against before anything is loaded.

Cosmos3 Nano and Super carry action heads (`action_gen` in the transformer config): an action token
per transition of a chunk joins the generator's sequence after the video (and sound) tokens, projected
by a per-embodiment ("domain") linear. Three modes use them: `forward_dynamics` rolls a video out of
a first frame and given actions, `inverse_dynamics` infers the actions of a given clip, and `policy`
rolls out video and actions together from a first frame. A chunk of N actions pairs with N + 1 video
frames; the conditioning frame is scaled (never up) and padded into a canvas of the action tier whose
aspect ratio is nearest the input's, and the video keeps the input's shape.

These tables restate diffusers 0.42.1's (pipeline_cosmos3_omni.py: `_EMBODIMENT_TO_DOMAIN_ID`,
`_EMBODIMENT_TO_RAW_ACTION_DIM`, `_ACTION_RESOLUTION_BINS`, `_ACTION_VIEWPOINT_TEMPLATES`) so this
layer needs no torch; tests/model/test_actions.py holds them equal to diffusers'. The run itself uses
diffusers' own helpers.
"""

from __future__ import annotations

from .geometry import TEMPORAL_COMPRESSION

ACTION_MODES: tuple[str, ...] = ("forward_dynamics", "inverse_dynamics", "policy")
MODE_ALIASES = {"wam": "policy"}  # cosmos-framework's name of the policy mode ("world action model")

# Embodiment -> domain id: which row of the action projections a token uses.
DOMAIN_IDS: dict[str, int] = {
    "no_action": 0,
    "av": 1,
    "camera_pose": 2,
    "hand_pose": 3,
    "pusht": 4,
    "libero": 5,
    "umi": 6,
    "bridge_orig_lerobot": 7,
    "droid_lerobot": 8,
    "robomind-franka": 8,
    "galbot": 9,
    "robomind-franka-dual": 12,
    "robomind-ur": 13,
    "agibotworld": 15,
    "agibot_gear_gripper": 15,
    "agibot_gear_gripper_ext": 15,
    "fractal": 20,
}

# Embodiment -> numbers per action row (poses are 9: translation + 6D rotation; a gripper 1). Domains
# without a fixed width (no_action, libero) run no action mode.
ACTION_WIDTHS: dict[str, int] = {
    "av": 9,
    "camera_pose": 9,
    "pusht": 2,
    "umi": 10,
    "bridge_orig_lerobot": 10,
    "droid_lerobot": 10,
    "robomind-franka": 10,
    "robomind-franka-dual": 20,
    "robomind-ur": 10,
    "galbot": 30,
    "agibotworld": 29,
    "agibot_gear_gripper": 29,
    "agibot_gear_gripper_ext": 29,
    "fractal": 10,
    "hand_pose": 57,
}

# Action tier -> aspect ratio -> canvas (height, width): the conditioning frame is padded into the one
# whose height/width ratio is nearest the input's (diffusers keys them by that ratio).
ACTION_TIERS: dict[int, dict[str, tuple[int, int]]] = {
    256: {"1,1": (256, 256), "4,3": (256, 320), "3,4": (320, 256), "16,9": (192, 320), "9,16": (320, 192)},
    480: {"1,1": (640, 640), "4,3": (544, 736), "3,4": (736, 544), "16,9": (480, 832), "9,16": (832, 480)},
    704: {"1,1": (960, 960), "4,3": (832, 1088), "3,4": (1088, 832), "16,9": (704, 1280), "9,16": (1280, 704)},
    720: {"1,1": (960, 960), "4,3": (832, 1104), "3,4": (1104, 832), "16,9": (720, 1280), "9,16": (1280, 720)},
}
DEFAULT_ACTION_TIER = 480

VIEW_POINTS: tuple[str, ...] = ("ego_view", "third_person_view", "wrist_view", "concat_view")
DEFAULT_VIEW = "ego_view"

DEFAULT_CHUNK = 16  # a policy's usual chunk: 16 transitions, a 17-frame clip
MAX_CHUNK = 1024  # 1025 frames, the longest video a request may ask for
MAX_ACTION_MAGNITUDE = 1e4  # actions are normalized poses and gripper states: far beyond any real row


def canonical_mode(mode: str) -> str:
    """The mode under its diffusers name (`wam` is `policy`)."""
    return MODE_ALIASES.get(mode, mode)


def action_frames(chunk: int) -> int:
    """Video frames paired with a chunk of `chunk` transitions."""
    return chunk + 1


def decoded_frames(chunk: int) -> int:
    """Frames the VAE decodes for a chunk: whole groups of 4 after the first (the rest are dropped)."""
    return chunk // TEMPORAL_COMPRESSION * TEMPORAL_COMPRESSION + 1


def canvas_aspect(height: int, width: int, tier: int) -> str:
    """The aspect ratio whose canvas of `tier` an input of this size is padded into: the nearest
    height/width ratio, as diffusers' `classify_height_width_bin` picks it (first of equals)."""
    ratio = height / width
    return min(ACTION_TIERS[tier], key=lambda aspect: abs(_ratio(ACTION_TIERS[tier][aspect]) - ratio))


def content_size(height: int, width: int, canvas: tuple[int, int]) -> tuple[int, int]:
    """(height, width) an input of this size is scaled to (down only) inside `canvas`; the video has it."""
    scale = min(canvas[1] / width, canvas[0] / height, 1.0)
    return max(1, int(scale * height + 0.5)), max(1, int(scale * width + 0.5))


def _ratio(size: tuple[int, int]) -> float:
    return size[0] / size[1]
