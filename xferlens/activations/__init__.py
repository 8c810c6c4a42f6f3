"""Activations: caching hook points over texts, shards on disk, pairing across models."""

from xferlens.activations import positions
from xferlens.activations.align import Pairs, align_sets, match_rows, paired_activations, same_tokenizer
from xferlens.activations.cache import (
    ActivationSet,
    cache_activations,
    iter_activations,
    load_activation_set,
    save_activation_set,
    token_rows,
)
from xferlens.activations.hooks import hook_name, resid_post, resolve_hooks
from xferlens.activations.live import LivePairs
from xferlens.activations.pair_shards import PairShards, pairs_to_disk
from xferlens.activations.shards import ShardedActivations, ShardError, cache_to_disk

__all__ = [
    "Pairs",
    "align_sets",
    "paired_activations",
    "same_tokenizer",
    "match_rows",
    "token_rows",
    "ActivationSet",
    "cache_activations",
    "iter_activations",
    "load_activation_set",
    "positions",
    "hook_name",
    "resid_post",
    "resolve_hooks",
    "save_activation_set",
    "LivePairs",
    "PairShards",
    "pairs_to_disk",
    "ShardedActivations",
    "ShardError",
    "cache_to_disk",
]
