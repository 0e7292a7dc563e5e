"""Sample counts of shards written by img2dataset (rom1504/img2dataset, `--output_format webdataset`).

Its layout: `OUT/00000.tar, 00001.tar, ...` (names zero-padded to `--oom_shard_count` digits),
each tar holding `<key>.jpg` (or the `--encode_format`), `<key>.txt` (the caption; empty when
the input row had none), `<key>.json` (the row's metadata) in completion order, keys
`<shard><position in the input shard>` such as `000010003`, with gaps where downloads failed.
Beside each tar: `<shard>.parquet` (one row per input row, failures included) and, written
after the tar is closed, `<shard>_stats.json` whose "successes" counts the samples written.

Only `_stats.json` is read (JSON; no parquet reader needed). The downloader counts a success
just before writing the sample, so a tar never holds more samples than "successes" (fewer only
if a write failed, which the stream then reports as a short shard): numbering each source's
samples by cumulative "successes" gives unique global ids. A tar without its stats file (an
unfinished download) leaves its whole source uncounted rather than half counted, so resampling
weights are never mixed from real counts and placeholders.
"""

from __future__ import annotations

import json
from pathlib import Path

from bigssl.errors import UserError

STATS_SUFFIX = "_stats.json"


def stats_path(url: str) -> Path:
    """'DIR/00003.tar' → 'DIR/00003_stats.json'."""
    path = Path(url)
    return path.with_name(path.name.removesuffix(".tar") + STATS_SUFFIX)


def _successes(path: Path) -> int:
    try:
        stats = json.loads(path.read_text())
        successes = stats["successes"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: not an img2dataset shard stats file ({err!r})") from err
    if not isinstance(successes, int) or isinstance(successes, bool) or successes < 0:
        raise UserError(f"{path}: 'successes' must be a non-negative integer, got {successes!r}")
    return successes


def source_counts(urls: list[str]) -> dict[str, tuple[int, int]] | None:
    """url → (samples, first_id within the source) for one source's local tar shards, in the
    order given; None unless every one of them has its `_stats.json`."""
    if not urls or not all(url.endswith(".tar") and stats_path(url).is_file() for url in urls):
        return None
    counts: dict[str, tuple[int, int]] = {}
    first_id = 0
    for url in urls:
        samples = _successes(stats_path(url))
        counts[url] = (samples, first_id)
        first_id += samples
    return counts
