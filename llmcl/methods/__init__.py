"""Continual-learning methods, one module each, registered by name. Methods never import each other."""

from __future__ import annotations

from llmcl.errors import RecipeError, did_you_mean
from llmcl.methods.base import Method, MethodConfig, StageInfo

REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available as `method.name: <cls.name>`."""
    REGISTRY[cls.name] = cls
    return cls


def get(name: str, key: str = "method.name") -> type[Method]:
    """The method class for `name`; an unknown name is a RecipeError listing near matches."""
    if name not in REGISTRY:
        raise RecipeError(key, message=f"recipe key '{key}': unknown method {name!r}{did_you_mean(name, REGISTRY)}")
    return REGISTRY[name]


def create(config: MethodConfig) -> Method:
    return get(config.name)(config)


from llmcl.methods import hft, ilora, lora, mora, osft, seqft  # noqa: E402,F401  (registration side effect)

__all__ = ["Method", "MethodConfig", "StageInfo", "REGISTRY", "register", "get", "create"]
