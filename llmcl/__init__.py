"""llmcl: continual fine-tuning of large language models, with forgetting measured."""

__version__ = "0.1.0"
