"""BEM core: the BEM layer, attachment to Hugging Face models, model factory, tokenizer and
checkpoints. Imports torch and transformers, so DAG files must not import it at top level."""

from __future__ import annotations

from bem_tasks.core.attach import (
    CACHE_PRODUCING_NAMES,
    DEFAULT_SITES,
    AttachReport,
    attach_bem,
    default_sites,
    detach_bem,
    fused_rank_for_parity,
)
from bem_tasks.core.bem import (
    BEMLayer,
    bem_disabled,
    bem_layers,
    bem_parameters,
    bem_routing,
    bem_streaming,
    collect_bem_stats,
    count_bem_parameters,
    hysteresis_decisions,
    reset_bem_stats,
    set_bem_routing,
)
from bem_tasks.core.checkpoint import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointManager,
    LoadedCheckpoint,
    atomic_directory,
    load_weights,
    save_weights,
    verify_checkpoint,
)
from bem_tasks.core.models import FAMILIES, build_config, build_model, load_model, save_model
from bem_tasks.core.tokenizer import ByteTokenizer, load_tokenizer

__all__ = [
    "CACHE_PRODUCING_NAMES",
    "DEFAULT_SITES",
    "FAMILIES",
    "AttachReport",
    "BEMLayer",
    "ByteTokenizer",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointManager",
    "LoadedCheckpoint",
    "atomic_directory",
    "attach_bem",
    "bem_disabled",
    "bem_layers",
    "bem_parameters",
    "bem_routing",
    "bem_streaming",
    "build_config",
    "build_model",
    "collect_bem_stats",
    "count_bem_parameters",
    "default_sites",
    "detach_bem",
    "fused_rank_for_parity",
    "hysteresis_decisions",
    "load_model",
    "load_tokenizer",
    "load_weights",
    "reset_bem_stats",
    "save_model",
    "save_weights",
    "set_bem_routing",
    "verify_checkpoint",
]
