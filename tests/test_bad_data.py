"""Bad data is skipped, counted by reason and reported; a stalled stream fails clearly."""

from __future__ import annotations

import json
import shutil
import tarfile
import time
from pathlib import Path

import pytest
import webdataset as wds
from datasets import encoded
from helpers import QUICKSTART, run_cli

from bigssl import recipes
from bigssl.data.loader import BatchLoader, DataError, DataStall
from bigssl.data.pipeline import EvalSample
from bigssl.data.shards import Shard, ShardSet, resolve
from bigssl.data.stream import ShardStream, StreamSpec
from bigssl.errors import UserError
from bigssl.train import train

GOOD_PER_SHARD = 10
VIEWS = recipes.load(None, ["data.views.size=16"]).data.views


def write_tar(path: Path, records: list[dict]) -> None:
    with wds.TarWriter(str(path)) as writer:
        for record in records:
            writer.write(record)


def good(key: int) -> dict:
    return {"__key__": f"{key:09d}", "jpg": encoded(key * 7, size=16, fmt="JPEG"), "cls": str(key % 2).encode()}


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shard 0: 10 good samples and one of each bad kind. Shard 1: 10 good samples, cut off
    in the middle of sample 6. Shard 2: 10 good samples."""
    root = tmp_path_factory.mktemp("damaged")
    jpeg = encoded(99, size=16, fmt="JPEG")
    bad = [
        {"__key__": "000000010", "jpg": jpeg[: len(jpeg) // 2], "cls": b"0"},  # truncated JPEG
        {"__key__": "000000011", "jpg": b"this is not an image", "cls": b"1"},  # garbage named .jpg
        {"__key__": "000000012", "txt": b"a caption and no image", "cls": b"0"},  # no image member
        {"__key__": "000000013", "jpg": jpeg},  # no label
    ]
    write_tar(root / "shard-000000.tar", [good(k) for k in range(10)] + bad)
    write_tar(root / "shard-000001.tar", [good(k) for k in range(14, 24)])
    with tarfile.open(root / "shard-000001.tar") as tar:
        cut = next(m for m in tar.getmembers() if m.name == "000000020.cls").offset + 100
    with open(root / "shard-000001.tar", "r+b") as handle:
        handle.truncate(cut)
    write_tar(root / "shard-000002.tar", [good(k) for k in range(24, 34)])
    index = {"format": "bigssl-shards/1", "samples": 34, "classes": ["even", "odd"],
             "shards": [{"name": "shard-000000.tar", "samples": 14, "first_id": 0},
                        {"name": "shard-000001.tar", "samples": 10, "first_id": 14},
                        {"name": "shard-000002.tar", "samples": 10, "first_id": 24}]}
    (root / "index.json").write_text(json.dumps(index))
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_each_kind_of_bad_data_is_skipped_and_counted(damaged: Path, workers: int):
    shards = resolve(str(damaged / "shard-{000000..000002}.tar"))
    stream = ShardStream(shards, EvalSample(VIEWS), StreamSpec(mode="exact", shuffle_buffer=4))
    loader = BatchLoader(stream, batch_size=4, workers=workers, keep_tail=True)
    ids = sorted(i for batch in loader for i in batch["id"].tolist())
    # Shard 1 yields samples 14..18, then is abandoned: the cut falls in the first header of
    # sample 20, before the reader could know that sample 19 was complete.
    assert ids == list(range(10)) + list(range(14, 19)) + list(range(24, 34))
    assert loader.skipped() == {"decode_error": 2, "no_image": 1, "missing_label": 1, "shard_error": 1}


def test_bad_data_is_reported_by_a_training_run(damaged: Path, tmp_path: Path):
    run = tmp_path / "run"
    result = run_cli("train", str(QUICKSTART), f"data.train={damaged}/shard-{{000000..000002}}.tar", "data.val=",
                     "data.mode=exact", "data.workers=1", "data.require_labels=true", "data.views.size=16",
                     "optim.batch_size=8", "optim.epochs=2", "model.backbone_args.channels=[8,16,32,64]",
                     f"log.dir={run}", "log.every_steps=1", "eval.knn_at_end=false", timeout=300)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    # Two epochs: every bad sample met twice, the cut shard twice.
    assert (last["data/skipped_decode_error"], last["data/skipped_no_image"], last["data/skipped_missing_label"],
            last["data/skipped_shard_error"]) == (4, 2, 2, 2)
    assert "skipped data: 4 decode_error, 2 no_image, 2 missing_label" in result.stderr
    assert "2 shard_error" in result.stderr
    # 25 good samples per epoch at batch 8: 3 steps each.
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_stream_that_hangs_fails_after_the_timeout(damaged: Path, workers: int):
    shards = resolve(f"pipe:exec sleep 30 2>/dev/null::{damaged}/shard-000002.tar")
    stream = ShardStream(shards, EvalSample(VIEWS), StreamSpec(mode="exact", interleave=2))
    start = time.monotonic()
    with pytest.raises(DataStall, match="no samples for 2 s"):
        list(BatchLoader(stream, batch_size=4, workers=workers, timeout_s=2))
    assert time.monotonic() - start < 20


def test_a_hanging_pipe_stops_training_with_one_line(tmp_path: Path):
    start = time.monotonic()
    result = run_cli("train", str(QUICKSTART), "data.train=pipe:exec sleep 60 2>/dev/null", "data.val=",
                     "data.samples_per_epoch=64", "data.timeout_s=3", "optim.batch_size=8",
                     "model.backbone_args.channels=[8,16,32,64]", f"log.dir={tmp_path}/run", timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("bigssl: error: data: no samples for 3 s")
    assert time.monotonic() - start < 50


def test_a_shard_that_disappears_mid_run_is_counted(damaged: Path, tmp_path: Path):
    copy = tmp_path / "copy"
    shutil.copytree(damaged, copy)
    shards = resolve(str(copy / "shard-{000000..000002}.tar"))  # checked at start: all there
    (copy / "shard-000002.tar").unlink()  # then lost before it is read
    stream = ShardStream(shards, EvalSample(VIEWS), StreamSpec(mode="exact"))
    loader = BatchLoader(stream, batch_size=4, workers=0, keep_tail=True)
    assert sum(len(batch["id"]) for batch in loader) == 15
    assert loader.skipped()["shard_error"] == 2  # the truncated shard and the missing one


@pytest.mark.parametrize("workers", [0, 1])
def test_a_resampled_stream_of_unreadable_shards_fails_instead_of_spinning(tmp_path: Path, workers: int):
    for i in range(3):
        (tmp_path / f"bad-{i}.tar").write_bytes(b"garbage" * 100)
    stream = ShardStream(resolve(str(tmp_path / "bad-{0..2}.tar")), EvalSample(VIEWS),
                         StreamSpec(mode="resampled"))
    with pytest.raises(DataError, match=r"data: 8 shards in a row gave no sample \({'shard_error': 8}\)"):
        next(iter(BatchLoader(stream, batch_size=4, workers=workers, timeout_s=60)))


# ------------------------------------------------------------------------------------- #18
def pipes(command: str, count: int = 40) -> ShardSet:
    """`count` shards read through the same `pipe:` command (no index: nothing counts them ahead)."""
    return ShardSet(tuple(Shard(f"pipe:{command}", 0, None, None) for _ in range(count)), (1.0,))


@pytest.mark.parametrize("command", ["false", "cat /missing/shard.tar 2>/dev/null", "sleep 0.05; exit 1"])
def test_every_failed_pipe_command_is_a_shard_error(command: str, capfd: pytest.CaptureFixture):
    """webdataset only polls the command while reading, and raises at close, which was swallowed:
    8, 4 and 9 of these 40 were counted."""
    loader = BatchLoader(ShardStream(pipes(command), EvalSample(VIEWS), StreamSpec(mode="exact")), batch_size=4,
                         workers=0, keep_tail=True)
    assert list(loader) == []
    assert loader.skipped() == {"shard_error": 40}
    err = capfd.readouterr().err
    assert f"bigssl: shard pipe:{command}: the command exited with status 1 after 0 samples\n" in err


def test_a_pipe_that_fails_after_its_samples_is_counted_once(damaged: Path, capfd: pytest.CaptureFixture):
    good_shard = damaged / "shard-000002.tar"
    shards = ShardSet(pipes(f"cat {good_shard}; exit 3", 2).shards + pipes(f"cat {good_shard}", 1).shards, (1.0,))
    loader = BatchLoader(ShardStream(shards, EvalSample(VIEWS), StreamSpec(mode="exact")), batch_size=4, workers=0,
                         keep_tail=True)
    # webdataset stops reading a command's output once it sees the failed exit, so how many of
    # its samples arrive first varies; the good command's all do.
    assert GOOD_PER_SHARD <= sum(len(batch["id"]) for batch in loader) <= 3 * GOOD_PER_SHARD
    assert loader.skipped() == {"shard_error": 2}
    assert capfd.readouterr().err.count(f"shard pipe:cat {good_shard}; exit 3: the command exited with status 3") == 2


def test_an_empty_shard_file_without_an_index_is_a_shard_error(damaged: Path, tmp_path: Path,
                                                              capfd: pytest.CaptureFixture):
    (tmp_path / "empty.tar").write_bytes(b"")  # a copy that failed: counted nowhere before
    shards = resolve(f"{tmp_path}/empty.tar::{damaged}/shard-000002.tar")
    assert shards.shards[0].samples is None
    loader = BatchLoader(ShardStream(shards, EvalSample(VIEWS), StreamSpec(mode="exact")), batch_size=4, workers=0,
                         keep_tail=True)
    assert sum(len(batch["id"]) for batch in loader) == GOOD_PER_SHARD
    assert loader.skipped() == {"shard_error": 1}
    assert f"unreadable shard {tmp_path}/empty.tar: empty (0 bytes)" in capfd.readouterr().err


def test_a_directory_given_as_shards_is_called_one(damaged: Path, tmp_path: Path):
    with pytest.raises(UserError, match=rf"^data.train: {damaged} is a directory, not a shard; pass its shards as a "
                                        rf"brace pattern: {damaged}/shard-\{{000000..000002\}}.tar$"):
        resolve(str(damaged))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"is a directory, not a shard; it holds no .tar shards"):
        resolve(str(tmp_path / "empty"), "data.val")


def test_the_last_metrics_record_agrees_with_the_end_of_run_summary(tmp_path: Path, capfd: pytest.CaptureFixture):
    """One shard, read in order: 16 good samples, then 8 undecodable ones. Batch 8 plans 3 steps
    of its 24 samples; 2 run, and the bad tail arrives as the epoch runs dry, after the last log
    step: metrics.jsonl ended with no skips while the summary said 8."""
    root = tmp_path / "ds"
    root.mkdir()
    write_tar(root / "shard-000000.tar", [good(k) for k in range(16)]
              + [{"__key__": f"{k:09d}", "jpg": b"not an image", "cls": b"0"} for k in range(16, 24)])
    (root / "index.json").write_text(json.dumps({"format": "bigssl-shards/1", "samples": 24, "classes": ["a", "b"],
                                                 "shards": [{"name": "shard-000000.tar", "samples": 24,
                                                             "first_id": 0}]}))
    run = tmp_path / "run"
    train(recipes.load(QUICKSTART, [
        f"data.train={root}/shard-000000.tar", "data.val=", "data.mode=exact", "data.workers=0",
        "data.shuffle_buffer=0", "data.interleave=1", "data.views.size=16", "optim.batch_size=8", "optim.epochs=1",
        "model.backbone_args.channels=[8,16,32,64]", "model.projector.hidden_dim=16", "model.projector.out_dim=8",
        f"log.dir={run}", "log.every_steps=1", "log.tensorboard=false", "log.progress=false",
        "eval.knn_at_end=false", "eval.knn_baseline=false", "checkpoint.every_steps=0"]))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert "data/skipped_decode_error" not in records[-2]  # step 2, as the window logged it
    assert records[-1]["step"] == 2 and records[-1]["data/skipped_decode_error"] == 8
    assert "bigssl: skipped data: 8 decode_error" in capfd.readouterr().err
