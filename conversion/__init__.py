"""Converters that build hf-moe models from existing checkpoints (dense upcycling, official releases)."""

from .build_mode import build_mode
from .convert_clip_moe_original import convert_clip_moe_original
from .merge_wemoe import merge_wemoe
from .upcycle_clip import upcycle_clip
from .upcycle_moiie import upcycle_moiie
