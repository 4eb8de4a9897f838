"""`python -m llmcl ...` and `accelerate launch -m llmcl train ...`."""

from llmcl.cli import main

if __name__ == "__main__":
    main()
