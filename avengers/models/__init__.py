"""Model families behind one registry: `get_model_spec(name).build()`."""

from avengers.models.registry import ModelSpec, get_model_spec, list_variants, register

__all__ = ["ModelSpec", "get_model_spec", "list_variants", "register"]
