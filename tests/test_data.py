import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bigssl.config import ViewsConfig
from bigssl.data import quickstart
from bigssl.data.shards import ShardStream, StreamPosition, decode_image, loader, resolve, sample_count
from bigssl.data.views import build_policy, eval_transform
from bigssl.data.write import Sample, write_shards
from bigssl.errors import UserError


def png(value: int, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    samples = (Sample(png(i), "png", i % 3) for i in range(23))
    write_shards(samples, tmp_path / "ds", classes=["a", "b", "c"], maxcount=5)
    return tmp_path / "ds"


def test_writer_rolls_over_and_indexes(shards: Path):
    index = json.loads((shards / "index.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [5, 5, 5, 5, 3]
    assert [s["first_id"] for s in index["shards"]] == [0, 5, 10, 15, 20]
    assert index["samples"] == 23 and index["classes"] == ["a", "b", "c"]
    assert sorted(p.name for p in shards.glob("*.tar")) == [s["name"] for s in index["shards"]]


def test_writer_refuses_to_mix_datasets(shards: Path):
    with pytest.raises(UserError, match="already contains shards"):
        write_shards([Sample(png(1), "png", 0)], shards)


def test_resolve_brace_patterns_and_errors(shards: Path):
    urls = resolve(str(shards / "shard-{000000..000004}.tar"))
    assert len(urls) == 5 and sample_count(urls) == 23
    assert sample_count(urls[:2]) == 10
    with pytest.raises(UserError, match=r"shard-000005.tar \(5 of 10 missing\)"):
        resolve(str(shards / "shard-{000000..000009}.tar"), "data.train")
    with pytest.raises(UserError, match="data.val"):
        resolve(str(shards / "nothing-{5..4}.tar"), "data.val")


def keys_and_labels(sample: dict) -> tuple[int, int]:
    return int(sample["__key__"]), int(sample["cls"])


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (2, 0), (2, 2), (3, 1)])
def test_exact_mode_reads_every_sample_once_over_ranks_and_workers(shards: Path, world: int, workers: int):
    urls = resolve(str(shards / "shard-{000000..000004}.tar"))
    seen: list[int] = []
    for rank in range(world):
        stream = ShardStream(urls, keys_and_labels, StreamPosition(rank, world), resampled=False, shuffle_buffer=4)
        for keys, labels in loader(stream, batch_size=2, workers=workers, drop_last=False):
            seen += keys.tolist()
            assert (labels == keys % 3).all()
    assert sorted(seen) == list(range(23))


def test_resampled_stream_is_seeded_per_rank_and_epoch(shards: Path):
    urls = resolve(str(shards / "shard-{000000..000004}.tar"))

    def first(rank: int, epoch: int, seed: int = 0) -> list[int]:
        stream = ShardStream(urls, keys_and_labels, StreamPosition(rank, 2, seed, epoch), resampled=True,
                             shuffle_buffer=8)
        it = iter(stream)
        return [next(it)[0] for _ in range(30)]

    assert first(0, 0) == first(0, 0)
    assert first(0, 0) != first(1, 0)
    assert first(0, 0) != first(0, 1)
    assert len(set(first(0, 0))) > 5  # draws from several shards, not one


def test_quickstart_is_balanced_real_fashion_mnist():
    train_urls, val_urls = resolve("quickstart:train"), resolve("quickstart:val")
    assert sample_count(train_urls) == 10000 and sample_count(val_urls) == 2000
    index = json.loads((Path(train_urls[0]).parent / "index.json").read_text())
    assert index["classes"][0] == "t-shirt/top" and len(index["classes"]) == 10
    labels: Counter[int] = Counter()
    stream = ShardStream(val_urls, lambda s: (decode_image(s).size, int(s["cls"])), StreamPosition(),
                         resampled=False)
    for size, label in stream:
        assert size == (28, 28)
        labels[label] += 1
    assert labels == {c: 200 for c in range(10)}
    # Same shards on second use: written once, then reused.
    assert resolve("quickstart:train") == train_urls
    assert quickstart.materialize("train").is_dir()


def test_simclr_policy_gives_two_different_views_of_the_configured_size():
    config = ViewsConfig(size=24, crop_scale=[0.2, 1.0])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28, 3), dtype=np.uint8))
    torch.manual_seed(0)
    views = build_policy(config)(image)
    assert len(views) == 2 and all(v.shape == (3, 24, 24) and v.dtype == torch.float32 for v in views)
    assert not torch.equal(views[0], views[1])
    assert float(views[0].min()) >= 0.0 and float(views[0].max()) <= 1.0  # no normalisation by default
    plain = eval_transform(config)(image)
    assert torch.equal(plain, eval_transform(config)(image))  # evaluation view is deterministic


def test_shards_command_from_folder_and_file_list(tmp_path: Path):
    from helpers import run_cli

    src = tmp_path / "folder"
    for name, value in [("cat", 10), ("dog", 200)]:
        (src / name).mkdir(parents=True)
        for i in range(3):
            (src / name / f"{i}.png").write_bytes(png(value + i, size=40))
    out = tmp_path / "out"
    result = run_cli("shards", str(src), str(out), "--maxcount", "4", "--resize", "20", timeout=120)
    assert result.returncode == 0, result.stderr
    index = json.loads((out / "index.json").read_text())
    assert index["classes"] == ["cat", "dog"] and [s["samples"] for s in index["shards"]] == [4, 2]
    stream = ShardStream(resolve(str(out / "shard-{000000..000001}.tar")),
                         lambda s: (decode_image(s).size, int(s["cls"]), "jpg" in s), StreamPosition(), resampled=False)
    assert sorted(stream) == [((20, 20), 0, True)] * 3 + [((20, 20), 1, True)] * 3

    again = run_cli("shards", str(src), str(out), timeout=120)  # never mixes two datasets
    assert again.returncode == 2 and "already contains shards" in again.stderr

    listing = tmp_path / "list.csv"
    listing.write_text("path,label,text\nfolder/cat/0.png,cat,a cat\nfolder/dog/1.png,dog,\n")
    result = run_cli("shards", str(listing), str(tmp_path / "out2"), timeout=120)
    assert result.returncode == 0, result.stderr
    stream = ShardStream(resolve(str(tmp_path / "out2" / "shard-000000.tar")),
                         lambda s: (int(s["cls"]), s.get("txt", b"").decode()), StreamPosition(), resampled=False)
    assert list(stream) == [(0, "a cat"), (1, "")]
