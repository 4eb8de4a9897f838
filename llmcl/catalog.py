"""The shipped recipes: where they are and what each is for (its opening comment)."""

from __future__ import annotations

from pathlib import Path

from llmcl.errors import LlmclError


def recipes_dirs() -> list[Path]:
    """./recipes first, then the recipes/ folder next to the installed package (editable installs)."""
    dirs = [Path.cwd() / "recipes", Path(__file__).resolve().parents[1] / "recipes"]
    out: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [o.resolve() for o in out]:
            out.append(d)
    return out


def shipped() -> list[Path]:
    seen: dict[str, Path] = {}
    for d in recipes_dirs():
        for p in sorted(d.rglob("*.yaml")):
            rel = p.relative_to(d)
            if rel.parts[0] in ("accelerate", "deepspeed"):
                continue  # launcher configs, not recipes
            seen.setdefault(str(rel), p)
    return list(seen.values())


def purpose(path: Path) -> str:
    """The recipe's `description`, else its opening comment line (without '#')."""
    import yaml

    try:
        recipe = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        recipe = None
    if isinstance(recipe, dict) and isinstance(recipe.get("description"), str) and recipe["description"].strip():
        return " ".join(recipe["description"].split())
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def find(name_or_path: str) -> Path:
    """A recipe file path; a bare name like 'quickstart' finds a shipped recipe."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for candidate in shipped():
        if candidate.stem == name_or_path or candidate.name == name_or_path:
            return candidate
    raise LlmclError(f"recipe file '{name_or_path}' not found (llmcl recipes lists the shipped ones)")
