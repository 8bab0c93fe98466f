"""The telescoping-cache Llama (docs/telescoping-cache.md): schedule, attention, flex read-out,
model and registered variants. Its decode (recurrent) form is avengers.decode.telescoping."""

from avengers.models.telescoping.attention import (
    GainNorm,
    TeleOptions,
    TelescopingAttention,
    gather_attention,
    get_plan,
    node_values,
    telescoping_parallel,
)
from avengers.models.telescoping.model import HYBRID_PRESETS, TeleLlamaConfig, TelescopingLlama
from avengers.models.telescoping.schedule import (
    FMAP_PRESETS,
    Schedule,
    TelePlan,
    build_schedule,
    merge_level,
    merge_slot,
    resolve_fmap,
    window,
)
from avengers.models.telescoping.variants import tele_cache_bytes, tele_flops_per_token

__all__ = [
    "FMAP_PRESETS",
    "HYBRID_PRESETS",
    "GainNorm",
    "Schedule",
    "TeleLlamaConfig",
    "TeleOptions",
    "TelePlan",
    "TelescopingAttention",
    "TelescopingLlama",
    "build_schedule",
    "gather_attention",
    "get_plan",
    "merge_level",
    "merge_slot",
    "node_values",
    "resolve_fmap",
    "tele_cache_bytes",
    "tele_flops_per_token",
    "telescoping_parallel",
    "window",
]
