"""Drafter kinds (text-only, MASSV, MSD), their registry, and their training on Ray Train (drafters/training.py)."""

from drafters.causal_lm import CausalLMDrafter, CausalLMDraftModel
from drafters.massv import DRAFTER_CONFIG, LANGUAGE_MODEL_DIR, PROJECTOR_WEIGHTS, MassvDraftModel, MassvProjector
from drafters.msd import MsdDrafter, MsdDraftModel
from drafters.registry import DRAFTER_KINDS, check_drafter, drafter_kind, load_drafter, read_drafter_config
from drafters.text_only import TextOnlyDraftModel

__all__ = [
    "CausalLMDraftModel", "CausalLMDrafter", "DRAFTER_CONFIG", "DRAFTER_KINDS", "LANGUAGE_MODEL_DIR",
    "MassvDraftModel", "MassvProjector", "MsdDraftModel", "MsdDrafter", "PROJECTOR_WEIGHTS", "TextOnlyDraftModel",
    "check_drafter",
    "drafter_kind", "load_drafter", "read_drafter_config",
]
