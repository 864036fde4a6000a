"""Structured (channel) pruning over a traced channel dependency graph."""

from .distill import DetectorDistillLoss, kl_logits, level_sizes_for
from .gradual import ChannelPruner, Schedule
from .graph import CHANNEL_RULES, ChannelGraph, ChannelGroup, register_channel_rule, trace
from .importance import IMPORTANCES, Importance, get_importance, register_importance
from .structured import PruneConfig, PruneResult, apply_recipe, count_params, macs_of, prune, validate_recipe
from .surgery import register_surgery

__all__ = [
    "CHANNEL_RULES", "ChannelGraph", "ChannelGroup", "ChannelPruner", "DetectorDistillLoss", "IMPORTANCES",
    "Importance", "PruneConfig", "PruneResult", "Schedule", "apply_recipe", "count_params", "get_importance",
    "kl_logits", "level_sizes_for", "macs_of", "prune", "register_channel_rule", "register_importance",
    "register_surgery", "trace", "validate_recipe",
]
