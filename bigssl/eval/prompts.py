"""Class names and prompt templates for zero-shot classification.

`--classnames` / `--templates` take `auto` (the default), `imagenet` or a text file (one entry a
line, '#' lines are comments; a template holds '{}' where the class name goes).

- auto: the class names the labelled shards' index.json records (`bigssl shards`), with a few
  generic templates; except when those names are ImageNet-1k's 1000 WordNet ids in their
  standard, sorted order (what `bigssl shards` records for ImageNet's class folders): then the
  ImageNet lists below, so that a run's zero-shot score compares with published ones.
- imagenet: OpenAI's curated ImageNet-1k class names and its 80-template ensemble
  (imagenet_classnames.txt, imagenet_templates.txt beside this file, MIT licence), the lists
  behind CLIP's (Radford et al. 2021, arXiv 2103.00020) and open_clip's zero-shot numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

from bigssl.data.quickstart import readable
from bigssl.errors import UserError

AUTO, IMAGENET = "auto", "imagenet"
GENERIC_TEMPLATES = ("a photo of the {}.", "a black and white photo of the {}.", "a low resolution photo of the {}.",
                     "a cropped photo of the {}.")
IMAGENET_CLASSES = 1000
_WORDNET_ID = re.compile(r"n\d{8}")


@dataclass(frozen=True)
class PromptSet:
    names: tuple[str, ...]  # as they go into the templates; position = label
    templates: tuple[str, ...]
    origin: str  # where both came from, for the report


def parse_list(text: str, where: str) -> list[str]:
    entries = [line.strip() for line in text.splitlines()]
    entries = [entry for entry in entries if entry and not entry.startswith("#")]
    if not entries:
        raise UserError(f"{where}: no entries (one a line; '#' lines are comments)")
    return entries


def _packaged(name: str) -> list[str]:
    return parse_list(resources.files("bigssl.eval").joinpath(name).read_text(encoding="utf-8"), name)


def _from_file(path: str, option: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as file:
            return parse_list(file.read(), path)
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{option}: cannot read {path!r} (expected auto, imagenet or a text file): {err}") from err


def imagenet_names() -> list[str]:
    return _packaged("imagenet_classnames.txt")


def imagenet_templates() -> list[str]:
    return _packaged("imagenet_templates.txt")


def is_imagenet_folder_order(classes: list[str] | None) -> bool:
    """ImageNet-1k's WordNet ids, sorted: label i is then ImageNet's standard class i."""
    return (classes is not None and len(classes) == IMAGENET_CLASSES and classes == sorted(classes)
            and all(_WORDNET_ID.fullmatch(c) for c in classes))


def _check_against_index(names: list[str], index: list[str] | None, option: str, key: str) -> None:
    if index is None:
        return  # the labels are checked against the names once read
    if len(index) != len(names):
        raise UserError(f"{option}: {len(names)} class names, but the index.json of {key} records {len(index)} classes")
    if all(_WORDNET_ID.fullmatch(c) for c in index) and index != sorted(index):
        raise UserError(f"{option}: the index.json of {key} lists WordNet ids out of their sorted order, so its labels "
                        "are not ImageNet's standard class numbers")


def prompt_set(index: list[str] | None, classnames: str, templates: str, key: str) -> PromptSet:
    """The names and templates to score labelled shards with; `index`: the classes their
    index.json records (None without one)."""
    imagenet = classnames == IMAGENET or (classnames == AUTO and is_imagenet_folder_order(index))
    if imagenet:
        names = imagenet_names()
        _check_against_index(names, index, "--classnames", key)
        names_from = f"OpenAI's ImageNet-1k class names ({len(names)})"
    elif classnames == AUTO:
        if not index:
            raise UserError(f"{key}: zero-shot needs class names, and no index.json with 'classes' sits beside the "
                            "shards (give --classnames imagenet or a file)")
        names = [readable(name) for name in index]
        names_from = f"class names of {key}'s index.json ({len(names)})"
    else:
        names = _from_file(classnames, "--classnames")
        _check_against_index(names, index, "--classnames", key)
        names_from = f"class names from {classnames} ({len(names)})"

    if templates == IMAGENET or (templates == AUTO and imagenet):
        chosen, templates_from = imagenet_templates(), "OpenAI's ImageNet templates"
    elif templates == AUTO:
        chosen, templates_from = list(GENERIC_TEMPLATES), "generic templates"
    else:
        chosen, templates_from = _from_file(templates, "--templates"), f"templates from {templates}"
    missing = next((t for t in chosen if "{}" not in t), None)
    if missing is not None:
        raise UserError(f"--templates: template {missing!r} has no '{{}}' for the class name")
    return PromptSet(tuple(names), tuple(chosen), f"{names_from}, {templates_from} ({len(chosen)})")
