"""CLIP on shards in img2dataset's layout, as its webdataset writer leaves them: `00000.tar`, ...
holding `<key>.jpg/.json/.txt` in download-completion order (keys with gaps where downloads
failed, an empty `.txt` where the caption was missing) and a `00000_stats.json` beside each.
No `.parquet`: writing a real one needs pyarrow, which bigssl neither has nor needs (it reads
only the stats), so the test leaves it out rather than fake one."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from helpers import REPO, run_cli
from PIL import Image

from bigssl import config as config_lib
from bigssl import recipes
from bigssl.data.pipeline import TrainData
from bigssl.data.position import Consumed
from bigssl.data.shards import resolve
from bigssl.errors import ConfigError, UserError

ROWS = 16  # input rows per shard
# shard id → (positions whose download failed, positions whose caption was missing)
LAYOUT = {0: ({2, 9, 14}, {4, 11}), 1: ({0, 3, 7, 8, 12}, {5, 15})}
WRITTEN = sum(ROWS - len(failed) for failed, _ in LAYOUT.values())  # 13 + 11 = 24
CAPTIONLESS = sum(len(missing) for _, missing in LAYOUT.values())  # 4
TINY = ["data.views.size=16", "data.views.resize=16", "model.backbone_args.channels=[8,16,32,64]",
        "method.embed_dim=8", "method.context_length=32", "method.text_width=16", "method.text_layers=1",
        "method.text_heads=2"]


def jpeg(position: int) -> bytes:
    pixels = np.random.default_rng(position).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def key(shard: int, position: int) -> str:
    """img2dataset's key: shard id, then the row's position in its input shard (4 digits for
    its default 10,000 rows a shard), zero-padded to 5 + 4 digits."""
    return f"{shard * 10**4 + position:09d}"


def write_img2dataset(out: Path) -> dict[str, list[tuple[str, str]]]:
    """Writes the shards as img2dataset's WebDatasetSampleWriter and write_stats do (the same
    webdataset TarWriter on a file object, so the same pax headers); returns, per tar, its
    (key, caption) in the order written."""
    out.mkdir(parents=True)
    order: dict[str, list[tuple[str, str]]] = {}
    for shard, (failed, captionless) in LAYOUT.items():
        done = [p for p in range(ROWS) if p not in failed]
        random.Random(shard).shuffle(done)  # a thread pool's imap_unordered: completion order
        name = f"{shard:05d}"
        order[name] = []
        with open(out / f"{name}.tar", "wb") as file:
            writer = wds.TarWriter(file)
            for position in done:
                caption = "" if position in captionless else f"a photo of row {position} of shard {shard}"
                meta = {"url": f"https://example.com/{shard}/{position}.jpg", "caption": caption or None,
                        "key": key(shard, position), "status": "success", "error_message": None, "width": 32,
                        "height": 24, "original_width": 640, "original_height": 480}
                writer.write({"__key__": key(shard, position), "jpg": jpeg(position), "txt": caption,
                              "json": json.dumps(meta, indent=4)})
                order[name].append((key(shard, position), caption))
            writer.close()
        stats = {"count": ROWS, "successes": len(done), "failed_to_download": len(failed), "failed_to_resize": 0,
                 "duration": 1.5, "start_time": 1.0e9, "end_time": 1.0e9 + 1.5,
                 "status_dict": {"success": len(done), "HTTP Error 404: Not Found": len(failed)}}
        (out / f"{name}_stats.json").write_text(json.dumps(stats, indent=4))
    return order


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[tuple[str, str]]]]:
    out = tmp_path_factory.mktemp("img2dataset") / "cc"
    return out, write_img2dataset(out)


def pattern(out: Path) -> str:
    return str(out / "{00000..00001}.tar")


def clip_config(train: str, *extra: str) -> config_lib.Config:
    return recipes.load(REPO / "recipes" / "quickstart" / "clip.yaml",
                           [f"data.train={train}", "data.val=", "data.workers=0", "optim.batch_size=4", *TINY, *extra])


def test_the_shards_look_as_img2dataset_writes_them(web):
    out, order = web
    first = order["00000"][0][0]
    with tarfile.open(out / "00000.tar") as tar:
        names = tar.getnames()
        assert names[:3] == [f"{first}.jpg", f"{first}.json", f"{first}.txt"]  # TarWriter: sorted extensions
        assert tar.getmember(names[0]).pax_headers  # a float mtime: one pax header per member
        assert json.loads(tar.extractfile(names[1]).read())["key"] == first
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json"]


def test_sample_counts_and_ids_come_from_the_stats(web):
    out, order = web
    shards = resolve(pattern(out))
    assert [s.samples for s in shards.shards] == [len(order["00000"]), len(order["00001"])] == [13, 11]
    assert [s.first_id for s in shards.shards] == [0, 13] and shards.total == WRITTEN
    for mode in ("resampled", "exact"):  # an epoch is the written samples, not the input rows (32)
        assert TrainData(clip_config(pattern(out), f"data.mode={mode}"), 0, 1, 4).steps_per_epoch == WRITTEN // 4


def test_an_exact_epoch_reads_every_captioned_pair_once_and_counts_the_rest(web):
    out, order = web
    data = TrainData(clip_config(pattern(out), "data.mode=exact"), 0, 1, 4)
    loader = data.loader(0, 0, Consumed(), Consumed())
    seen: dict[int, str] = {}
    for batch in loader:
        assert batch["views"][0].shape == (4, 1, 3, 16, 16)
        for sample_id, text in zip(batch["id"].tolist(), batch["text"], strict=True):
            assert sample_id not in seen
            seen[sample_id] = text
    # Global id = the shard's first id (13 for the second) + the sample's place in its tar.
    expected = {first + i: caption for name, first in (("00000", 0), ("00001", 13))
                for i, (_, caption) in enumerate(order[name]) if caption}
    assert seen == expected and len(seen) == WRITTEN - CAPTIONLESS
    assert loader.skipped() == {"missing_text": CAPTIONLESS}  # nothing else: the .json members are ignored


def test_without_every_stats_file_the_epoch_length_must_be_given(web, tmp_path: Path):
    out, _ = web
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("00000.tar", "00000_stats.json", "00001.tar"):  # 00001 still downloading: no stats yet
        (partial / name).write_bytes((out / name).read_bytes())
    shards = resolve(pattern(partial))
    assert [s.samples for s in shards.shards] == [None, None]  # all or nothing per source
    with pytest.raises(ConfigError, match=r"^data\.samples_per_epoch: .*00000\.tar\); set it$"):
        TrainData(clip_config(pattern(partial)), 0, 1, 4)
    with pytest.raises(ConfigError, match=r"data\.mode=exact needs sample counts .*_stats\.json"):
        TrainData(clip_config(pattern(partial), "data.mode=exact"), 0, 1, 4)
    assert TrainData(clip_config(pattern(partial), "data.samples_per_epoch=20"), 0, 1, 4).steps_per_epoch == 5
    (partial / "00001_stats.json").write_text('{"successes": "eleven"}')
    with pytest.raises(UserError, match=r"00001_stats\.json: 'successes' must be a non-negative integer"):
        resolve(pattern(partial))
    (partial / "00001_stats.json").write_text("{not json")
    with pytest.raises(UserError, match=r"00001_stats\.json: not an img2dataset shard stats file"):
        resolve(pattern(partial))


def test_clip_trains_on_img2dataset_shards(web, tmp_path: Path):
    out, _ = web
    run = tmp_path / "run"
    result = run_cli("train", str(REPO / "recipes" / "quickstart" / "clip.yaml"), f"data.train={pattern(out)}",
                     "data.val=", "data.mode=exact", "data.workers=1", "optim.batch_size=4", "optim.epochs=2",
                     "log.every_steps=1", "checkpoint.every_steps=0", *TINY, f"log.dir={run}")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    # 20 captioned pairs an epoch make 5 batches of 4; the epoch was planned from the 24 written.
    assert [r["step"] for r in steps] == list(range(1, 11))
    assert [r["epoch"] for r in steps[:6]] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1 + 1 / 6])
    assert steps[-1]["data/skipped_missing_text"] == 2 * CAPTIONLESS
    assert all(np.isfinite(r["loss"]) for r in steps)
    assert f"skipped data: {2 * CAPTIONLESS} missing_text" in result.stderr
