"""Typed recipes: YAML files -> dataclass trees, with `key.sub=value` overrides and validation.

loader.py holds the rules (any dataclass tree), schema.py the sections of `align sft` and `align rl`.
"""

from align.recipe.loader import (
    Range,
    RecipeError,
    all_keys,
    apply_override,
    build,
    dump_recipe,
    load_recipe,
    read_yaml,
    to_dict,
)
from align.recipe.schema import GRPOSection, LoopSection, RecipeBase, RewardSpec, RLRecipe, RMRecipe, SFTRecipe

__all__ = [
    "GRPOSection", "LoopSection", "Range", "RecipeBase", "RecipeError", "RewardSpec", "RLRecipe", "RMRecipe",
    "SFTRecipe",
    "all_keys", "apply_override", "build", "dump_recipe", "load_recipe", "read_yaml", "to_dict",
]
