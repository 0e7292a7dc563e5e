"""Write samples to WebDataset tar shards plus an index, the one path every dataset takes.

`bigssl shards` (image folder or file list) and the embedded quickstart dataset both end in
`write_shards`, so the quickstart exercises the same files a user's ImageNet run reads.

Layout of OUT:
    shard-000000.tar ...   members `<id>.<ext>` (image bytes), `<id>.cls`, `<id>.txt`
    index.json             written last: shard names and sample counts, classes, sample ids
The key of a sample is its global sample id (zero-padded), so memory-bank methods can address
samples directly.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from PIL import Image

from bigssl.errors import UserError

INDEX_NAME = "index.json"
INDEX_FORMAT = "bigssl-shards/1"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


@dataclass
class Sample:
    image: bytes
    ext: str  # "jpg", "png", ...
    label: int | None = None
    text: str | None = None


def _shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def write_shards(samples: Iterable[Sample], out: Path, classes: list[str] | None = None,
                 maxcount: int = 10000, maxsize: int = 1 << 30) -> dict:
    """Write `samples` into tar shards under `out`; returns the index (also saved as index.json).

    Refuses an `out` that already holds shards or an index: two datasets never mix silently.
    """
    out = Path(out)
    if out.exists() and (any(out.glob("*.tar")) or (out / INDEX_NAME).exists()):
        raise UserError(f"{out} already contains shards; choose an empty output directory")
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    writer: wds.TarWriter | None = None
    count = size = total = 0

    def close() -> None:
        if writer is not None:
            writer.close()
            shards.append({"name": _shard_name(len(shards)), "samples": count,
                           "first_id": total - count})

    for sample in samples:
        if writer is None or count >= maxcount or size >= maxsize:
            close()
            # A fixed mtime: the same input gives byte-identical shards, and no pax header per member.
            writer = wds.TarWriter(str(out / _shard_name(len(shards))), mtime=0)
            count = size = 0
        record: dict[str, object] = {"__key__": f"{total:09d}", sample.ext: sample.image}
        if sample.label is not None:
            record["cls"] = str(sample.label).encode()
        if sample.text is not None:
            record["txt"] = sample.text.encode()
        writer.write(record)
        count += 1
        total += 1
        size += len(sample.image)
    close()
    if total == 0:
        raise UserError(f"no samples to write into {out}")
    index = {"format": INDEX_FORMAT, "samples": total, "classes": classes or [], "shards": shards}
    tmp = out / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out / INDEX_NAME)
    return index


def _encode(path: Path, resize: int | None, quality: int) -> tuple[bytes, str]:
    if resize is None:
        ext = path.suffix.lower().lstrip(".")
        return path.read_bytes(), "jpg" if ext == "jpeg" else ext
    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = resize / min(image.size)
        if scale < 1:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue(), "jpg"


def folder_samples(src: Path, resize: int | None = None, quality: int = 90) -> tuple[list[str], Iterator[Sample]]:
    """An image folder with one subfolder per class (ImageFolder layout)."""
    classes = sorted(p.name for p in src.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"{src}: no class subfolders found")
    files = [(label, f) for label, name in enumerate(classes) for f in sorted((src / name).rglob("*"))
             if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise UserError(f"{src}: no images found in its class subfolders")

    def generate() -> Iterator[Sample]:
        for label, path in files:
            image, ext = _encode(path, resize, quality)
            yield Sample(image, ext, label)

    return classes, generate()


def list_samples(src: Path, resize: int | None = None, quality: int = 90) -> tuple[list[str], Iterator[Sample]]:
    """A CSV (header: path,label[,text]) or JSONL ({"path", "label"?, "text"?}) file list."""
    if src.suffix.lower() == ".jsonl":
        rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    else:
        with src.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    if not rows or "path" not in rows[0]:
        raise UserError(f"{src}: expected rows with a 'path' column/field")
    names = sorted({str(r["label"]) for r in rows if r.get("label") not in (None, "")})
    numeric = all(n.lstrip("-").isdigit() for n in names)
    classes = [] if numeric else names
    lookup = {n: i for i, n in enumerate(names)}

    def generate() -> Iterator[Sample]:
        for row in rows:
            path = Path(row["path"])
            if not path.is_absolute():
                path = src.parent / path
            if not path.is_file():
                raise UserError(f"{src}: listed image not found: {path}")
            label = row.get("label")
            label_id = None if label in (None, "") else int(label) if numeric else lookup[str(label)]
            image, ext = _encode(path, resize, quality)
            yield Sample(image, ext, label_id, row.get("text") or None)

    return classes, generate()
