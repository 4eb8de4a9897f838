"""Rewrite the generated parts of README.md (python scripts/gen_reference.py): the recipe key reference from the
config dataclasses, and the methods' compatibility table from their declared ZeRO refusals."""

from pathlib import Path

from llmcl.reference import compat_table, render

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = {"reference": render, "compat": compat_table}


def updated(text: str) -> str:
    for name, make in BLOCKS.items():
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{start}\n{make()}{end}{tail}"
    return text


if __name__ == "__main__":
    README.write_text(updated(README.read_text()))
    print(f"updated {README}")
