"""Continual-learning methods, one module each, registered by name. Methods never import each other."""

from __future__ import annotations

from llmcl.errors import RecipeError, did_you_mean
from llmcl.methods.base import Method, MethodConfig, StageInfo, StepInputs

REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available as `method.name: <name>`, the default of its config's `name`
    field (the one place a method's name is written); a name already taken is refused."""
    cls.name = cls.config_class.name
    taken = REGISTRY.get(cls.name)
    if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"method name {cls.name!r} is already registered by {taken.__module__}.{taken.__qualname__}")
    REGISTRY[cls.name] = cls
    return cls


def get(name: str, key: str = "method.name") -> type[Method]:
    """The method class for `name`; an unknown name is a RecipeError listing near matches."""
    if name not in REGISTRY:
        raise RecipeError(key, message=f"recipe key '{key}': unknown method {name!r}{did_you_mean(name, REGISTRY)}")
    return REGISTRY[name]


def create(config: MethodConfig) -> Method:
    return get(config.name)(config)


# the registry: one line per method module
from llmcl.methods import hft, ilora, lora, mora, osft, seqft  # noqa: E402,F401  (registration side effect)

__all__ = ["Method", "MethodConfig", "StageInfo", "StepInputs", "REGISTRY", "register", "get", "create"]
