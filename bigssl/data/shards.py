"""Which shards a run reads: patterns → URLs, checked at start, with what their index knows.

`data.train` is one or more brace patterns joined by '::' (each one a *source*, mixed by
`data.weights` in resampled mode), local paths or `pipe:`/URL schemes, or `quickstart:<split>`.
When an `index.json` written by `bigssl shards` lies beside local shards, every shard's sample
count and first global sample id are known: exact epochs, resumable positions and memory
banks rely on that. Shards written by img2dataset carry no index; their per-shard
`_stats.json` gives the same (`bigssl.data.img2dataset`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import braceexpand

from bigssl.data import img2dataset, quickstart
from bigssl.data.write import INDEX_NAME
from bigssl.errors import ConfigError, UserError


def is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


@dataclass(frozen=True)
class Shard:
    url: str
    source: int  # position of its pattern in data.train
    samples: int | None  # from index.json; None when unknown
    first_id: int | None  # global id of its first sample (offset by earlier sources)


@dataclass(frozen=True)
class ShardSet:
    shards: tuple[Shard, ...]
    weights: tuple[float, ...]  # one per source

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.shards]

    @property
    def counted(self) -> bool:
        return all(s.samples is not None for s in self.shards)

    @property
    def total(self) -> int | None:
        return sum(s.samples for s in self.shards) if self.counted else None  # type: ignore[misc]

    def first_uncounted(self) -> str | None:
        return next((s.url for s in self.shards if s.samples is None), None)

    def require_counts(self, why: str) -> None:
        if not self.counted:
            raise ConfigError(f"{why} needs sample counts from an index.json beside the shards (written by "
                              f"bigssl shards) or img2dataset's _stats.json beside each; none for "
                              f"{self.first_uncounted()}")


def _expand(pattern: str, key: str) -> list[list[str]]:
    if pattern.startswith(quickstart.SCHEME):
        try:
            pattern = quickstart.pattern(pattern)
        except UserError as err:
            raise UserError(f"{key}: {err}") from err
    sources = [list(braceexpand.braceexpand(part)) for part in pattern.split("::") if part.strip()]
    if not sources or not all(sources):
        raise UserError(f"{key}: pattern {pattern!r} matches no shards")
    return sources


def _index_counts(urls: list[str]) -> dict[str, tuple[int, int]]:
    """url → (samples, first_id) for local shards whose directory holds an index."""
    found: dict[str, tuple[int, int]] = {}
    for directory in {Path(u).parent for u in urls if not is_remote(u)}:
        path = directory / INDEX_NAME
        if not path.is_file():
            continue
        try:
            index = json.loads(path.read_text())
            entries = {e["name"]: (int(e["samples"]), int(e["first_id"])) for e in index["shards"]}
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{path}: not a bigssl shard index ({err})") from err
        for url in urls:
            if Path(url).parent == directory and Path(url).name in entries:
                found[url] = entries[Path(url).name]
    return found


def _pattern_hint(directory: Path) -> str:
    """What to pass instead of a directory: the brace pattern of the numbered .tar shards in it."""
    numbered = [re.fullmatch(r"(.*?)(\d+)\.tar", p.name) for p in sorted(directory.glob("*.tar"))]
    if not numbered:
        return "it holds no .tar shards (write them with `bigssl shards`)"
    if all(numbered) and len({(m.group(1), len(m.group(2))) for m in numbered}) == 1:
        prefix, first, last = numbered[0].group(1), numbered[0].group(2), numbered[-1].group(2)
        return f"pass its shards as a brace pattern: {directory / prefix}{{{first}..{last}}}.tar"
    return f"pass its {len(numbered)} .tar shards as a brace pattern such as {directory}/shard-{{000000..000009}}.tar"


def resolve(pattern: str, key: str = "data.train", weights: list[float] | None = None) -> ShardSet:
    """Expand `pattern`, check that local shards exist, attach their index entries."""
    sources = _expand(pattern, key)
    if weights and len(weights) != len(sources):
        raise ConfigError(f"data.weights: {len(weights)} weights for {len(sources)} sources in {key}")
    if weights and (min(weights) < 0 or sum(weights) <= 0):
        raise ConfigError("data.weights: weights must be non-negative and not all zero")
    urls = [u for source in sources for u in source]
    missing = [u for u in urls if not is_remote(u) and not Path(u).is_file()]
    if missing and Path(missing[0]).is_dir():
        raise UserError(f"{key}: {missing[0]} is a directory, not a shard; {_pattern_hint(Path(missing[0]))}")
    if missing:
        raise UserError(f"{key}: shard not found: {missing[0]} ({len(missing)} of {len(urls)} missing)")
    counts = _index_counts(urls)
    for source in sources:
        if not any(u in counts or is_remote(u) for u in source):
            counts.update(img2dataset.source_counts(source) or {})
    shards: list[Shard] = []
    offset = 0
    for source_index, source in enumerate(sources):
        source_total = 0
        for url in source:
            samples, first_id = counts.get(url, (None, None))
            shards.append(Shard(url, source_index, samples,
                                None if first_id is None else offset + first_id))
            source_total = max(source_total, (first_id or 0) + (samples or 0))
        offset += source_total  # ids of a later source start after the earlier ones
    return ShardSet(tuple(shards), tuple(weights or [1.0] * len(sources)))
