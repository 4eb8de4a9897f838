"""Rewrite the recipe key reference in README.md from the config dataclasses (python scripts/gen_reference.py)."""

from pathlib import Path

from llmcl.reference import render

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- reference:start -->", "<!-- reference:end -->"


def updated(text: str) -> str:
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{render()}{END}{tail}"


if __name__ == "__main__":
    README.write_text(updated(README.read_text()))
    print(f"updated {README}")
