"""Stage data: sources, the built-in task stream, formatting into token examples, deterministic batching."""
