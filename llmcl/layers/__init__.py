"""Layer types that stage artifacts can hold besides plain HF models and PEFT adapters; model code shared by
methods and the artifact loaders. Importing the package registers each type's loader with llmcl.rundir.artifacts."""

from llmcl.layers import mora  # noqa: F401  (registers the "mora" artifact kind)
