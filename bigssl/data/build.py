"""`bigssl shards SRC OUT`: an image folder or a CSV/JSONL file list → tar shards + index.

Inputs are listed first (and shuffled with a seed, so a class-sorted folder does not become
class-sorted shards), then encoded by a pool of worker processes in order, so the same input
and options always give the same shards. `OUT/.progress.json` records the fingerprint of the
input list and options and each finished shard: running the command again on the same OUT
resumes after the last finished shard, reports a finished one as done, and refuses anything
else — two datasets never mix.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import multiprocessing
import os
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from bigssl.data.decode import decode_array
from bigssl.data.write import INDEX_NAME, Sample, ShardWriter
from bigssl.errors import UserError

PROGRESS_NAME = ".progress.json"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


@dataclass(frozen=True)
class Item:
    path: str
    label: int | None = None
    text: str | None = None


@dataclass(frozen=True)
class Options:
    maxcount: int = 10000
    maxsize: int = 1 << 30
    resize: int | None = None  # short side; re-encodes as JPEG
    quality: int = 90
    shuffle_seed: int | None = 0  # None = keep the listing order


def folder_items(src: Path) -> tuple[list[str], list[Item]]:
    """ImageFolder layout: one subfolder per class, images anywhere below it."""
    classes = sorted(p.name for p in src.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"{src}: no class subfolders found")
    items = [Item(str(f), label) for label, name in enumerate(classes) for f in sorted((src / name).rglob("*"))
             if f.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise UserError(f"{src}: no images found in its class subfolders")
    return classes, items


def list_items(src: Path) -> tuple[list[str], list[Item]]:
    """A CSV (header: path,label[,text]) or JSONL ({"path", "label"?, "text"?}); relative paths
    are relative to the list's folder. Non-numeric labels become classes in sorted order."""
    if src.suffix.lower() == ".jsonl":
        try:
            rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise UserError(f"{src}: not valid JSON lines ({err})") from err
    else:
        with src.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    if not rows or any("path" not in row for row in rows):
        raise UserError(f"{src}: every row needs a 'path'")
    names = sorted({str(r["label"]) for r in rows if r.get("label") not in (None, "")})
    numeric = all(n.lstrip("-").isdigit() for n in names)
    lookup = {n: i for i, n in enumerate(names)}
    items = []
    for row in rows:
        path = Path(row["path"])
        path = path if path.is_absolute() else src.parent / path
        label = row.get("label")
        label_id = None if label in (None, "") else int(label) if numeric else lookup[str(label)]
        items.append(Item(str(path), label_id, row.get("text") or None))
    return ([] if numeric else names), items


# The formats the reader takes an image member of (bigssl/data/decode.py), by PIL's name for
# them, and the member's extension. MPO is the JPEG variant some cameras write.
READABLE_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}


def _readable(data: bytes) -> tuple[bytes, str, str | None]:
    """(bytes, member extension, the format it was converted from) of one input, taken as is
    when training can read it and decodes (with the training decoder, so a damaged file is
    skipped here once rather than at every epoch). Other formats PIL reads (GIF, TIFF, ...) would
    be a member the reader never looks at: they become lossless PNG. The extension comes from
    the content, never the file name: an input named `x.cls` must not become the label member."""
    with Image.open(io.BytesIO(data)) as image:
        kind = image.format or "unknown"
        if kind not in READABLE_FORMATS:
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG")
            return buffer.getvalue(), "png", kind
    decode_array(data)
    return data, READABLE_FORMATS[kind], None


def _resized_jpeg(path: Path, options: Options) -> bytes:
    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = options.resize / min(image.size)
        if scale < 1:  # only ever shrink
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=options.quality)
    return buffer.getvalue()


def encode(item: Item, options: Options) -> Sample | str:
    """The sample for one input, or a one-line reason to skip it (runs in pool workers)."""
    path = Path(item.path)
    try:
        if options.resize is not None:
            return Sample(_resized_jpeg(path, options), "jpg", item.label, item.text)
        data, ext, converted_from = _readable(path.read_bytes())
        return Sample(data, ext, item.label, item.text, converted_from)
    except Exception as err:  # unreadable or undecodable: skipped and counted, never fatal
        return f"{path}: {err}"


def _encode_star(args: tuple[Item, Options]) -> Sample | str:
    return encode(*args)


def fingerprint(items: list[Item], classes: list[str], options: Options) -> str:
    digest = hashlib.sha256(json.dumps({"classes": classes, "options": asdict(options)}).encode())
    for item in items:
        digest.update(json.dumps(asdict(item)).encode())
    return digest.hexdigest()


def _read_progress(out: Path, print_of: str) -> dict | None:
    path = out / PROGRESS_NAME
    if not path.exists():
        return None
    progress = json.loads(path.read_text())
    if progress.get("fingerprint") != print_of:
        raise UserError(f"{out} holds shards of another input or other options; use an empty directory "
                        f"(or delete {out})")
    return progress


def _save_progress(out: Path, progress: dict) -> None:
    tmp = out / (PROGRESS_NAME + ".tmp")
    tmp.write_text(json.dumps(progress))
    os.replace(tmp, out / PROGRESS_NAME)


def _note_conversion(item: Item, sample: Sample, counter: dict[str, int], bar: tqdm) -> None:
    if sample.converted_from is None:
        return
    counter["converted"] += 1
    if counter["converted"] <= 5:
        bar.write(f"bigssl: converting {item.path} ({sample.converted_from}, a format training does not read) "
                  "to PNG", file=sys.stderr)


def _listing(src: Path, options: Options) -> tuple[list[str], list[Item]]:
    """The classes and the items of `src` (a folder or a list), in the order they are written."""
    if src.is_dir():
        classes, items = folder_items(src)
    elif src.is_file():
        classes, items = list_items(src)
    else:
        raise UserError(f"shards: source not found: {src}")
    if options.shuffle_seed is not None:
        random.Random(options.shuffle_seed).shuffle(items)
    return classes, items


def build(src: Path, out: Path, options: Options, workers: int = 0, progress_bar: bool = True) -> dict:
    """Write (or finish writing) the shards of `src` into `out`; returns the index."""
    classes, items = _listing(src, options)
    print_of = fingerprint(items, classes, options)

    out.mkdir(parents=True, exist_ok=True)
    progress = _read_progress(out, print_of)
    if progress is None and any(out.iterdir()):
        raise UserError(f"{out} is not empty and was not written by this command; choose an empty directory")
    if progress is not None and (out / INDEX_NAME).exists():
        print(f"{out}: already complete", file=sys.stderr)
        return json.loads((out / INDEX_NAME).read_text())
    progress = progress or {"fingerprint": print_of, "shards": [], "items_done": 0, "skipped": 0}
    done = {s["name"] for s in progress["shards"]}
    for stale in out.glob("shard-*.tar"):  # a shard cut off by the interruption
        if stale.name not in done:
            stale.unlink()
    _save_progress(out, progress)

    counter = {"items": progress["items_done"], "skipped": progress["skipped"],
               "converted": progress.get("converted", 0)}

    def shard_closed(shards: list[dict]) -> None:
        progress.update(shards=list(shards), items_done=counter["items"], skipped=counter["skipped"],
                        converted=counter["converted"])
        _save_progress(out, progress)

    writer = ShardWriter(out, options.maxcount, options.maxsize, progress["shards"], on_shard=shard_closed)
    todo = items[progress["items_done"]:]
    workers = workers or os.cpu_count() or 1
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool, \
                tqdm(total=len(items), initial=progress["items_done"], unit="img", disable=not progress_bar,
                     file=sys.stderr) as bar:
            for item, result in zip(todo, pool.imap(_encode_star, ((item, options) for item in todo), chunksize=16),
                                    strict=True):
                if isinstance(result, str):
                    counter["skipped"] += 1
                    if counter["skipped"] <= 5:
                        bar.write(f"bigssl: skipping {result}", file=sys.stderr)
                else:
                    _note_conversion(item, result, counter, bar)
                    writer.write(result)  # may close a shard first, recording the items before this one
                counter["items"] += 1
                bar.update(1)
    except BaseException:
        writer.abandon()
        raise
    return writer.finish(classes, {"skipped_inputs": counter["skipped"], "converted_inputs": counter["converted"]})
