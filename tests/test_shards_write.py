import json
from pathlib import Path

import pytest
from datasets import encoded, make_shards, pattern
from helpers import run_cli

from bigssl.data import build as build_module
from bigssl.data.build import Options, build
from bigssl.data.shards import resolve
from bigssl.data.stream import ShardStream, StreamSpec
from bigssl.data.write import Sample, write_shards
from bigssl.errors import UserError


def test_writer_rolls_over_and_indexes(tmp_path: Path):
    shards = make_shards(tmp_path / "ds", 23, 5)
    index = json.loads((shards / "index.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [5, 5, 5, 5, 3]
    assert [s["first_id"] for s in index["shards"]] == [0, 5, 10, 15, 20]
    assert index["samples"] == 23 and index["classes"] == ["c0", "c1", "c2"]
    assert sorted(p.name for p in shards.glob("*.tar")) == [s["name"] for s in index["shards"]]


def test_writer_refuses_to_mix_datasets(tmp_path: Path):
    shards = make_shards(tmp_path / "ds", 4, 5)
    with pytest.raises(UserError, match="already contains shards"):
        write_shards([Sample(encoded(1), "png", 0)], shards)


def raw_samples(shard_pattern: str) -> list[dict]:
    def fields(sample: dict) -> dict:
        return {"key": sample["__key__"], "cls": int(sample["cls"]), "text": sample.get("txt", b"").decode(),
                "jpg": "jpg" in sample}

    stream = ShardStream(resolve(shard_pattern), fields, StreamSpec(mode="exact", shuffle_buffer=0, interleave=1))
    out = []
    for micro in stream:
        data = micro["data"]
        out += [{name: (value[i] if isinstance(value, list) else value[i].item()) for name, value in data.items()}
                for i in range(len(micro["good"]))]
    return sorted(out, key=lambda sample: sample["id"])  # file order (the stream deals shards shuffled)


def test_shards_command_from_folder_and_file_list(tmp_path: Path):
    src = tmp_path / "folder"
    for name, value in [("cat", 10), ("dog", 200)]:
        (src / name).mkdir(parents=True)
        for i in range(3):
            (src / name / f"{i}.png").write_bytes(encoded(value + i, size=40))
    out = tmp_path / "out"
    result = run_cli("shards", str(src), str(out), "--maxcount", "4", "--resize", "20", timeout=120)
    assert result.returncode == 0, result.stderr
    index = json.loads((out / "index.json").read_text())
    assert index["classes"] == ["cat", "dog"] and [s["samples"] for s in index["shards"]] == [4, 2]
    samples = raw_samples(pattern(out, 2))
    assert sorted(s["id"] for s in samples) == list(range(6))
    assert all(int(s["key"]) == s["id"] and s["jpg"] for s in samples)  # the key is the global id
    assert sorted(s["cls"] for s in samples) == [0, 0, 0, 1, 1, 1]

    again = run_cli("shards", str(src), str(out), "--maxcount", "4", "--resize", "20", timeout=120)
    assert again.returncode == 0 and "already complete" in again.stderr
    other = run_cli("shards", str(src), str(out), timeout=120)  # other options: never mixed in
    assert other.returncode == 2 and "another input or other options" in other.stderr

    listing = tmp_path / "list.csv"
    listing.write_text("path,label,text\nfolder/cat/0.png,cat,a cat\nfolder/dog/1.png,dog,\n")
    result = run_cli("shards", str(listing), str(tmp_path / "out2"), timeout=120)
    assert result.returncode == 0, result.stderr
    samples = raw_samples(str(tmp_path / "out2" / "shard-000000.tar"))
    assert [(s["cls"], s["text"]) for s in samples] == [(0, "a cat"), (1, "")]


def image_folder(root: Path, per_class: int = 12) -> Path:
    for name, value in [("cat", 10), ("dog", 120), ("emu", 200)]:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i:03d}.png").write_bytes(encoded(value + i, size=24))
    return root


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))}


def test_build_is_deterministic_parallel_and_shuffled(tmp_path: Path):
    src = image_folder(tmp_path / "src")
    one = build(src, tmp_path / "one", Options(maxcount=10), workers=1, progress_bar=False)
    two = build(src, tmp_path / "two", Options(maxcount=10), workers=2, progress_bar=False)
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two")  # same input, same bytes
    assert one["shards"] == two["shards"] and [s["samples"] for s in one["shards"]] == [10, 10, 10, 6]
    labels = [s["cls"] for s in raw_samples(pattern(tmp_path / "one", 4))]
    assert sorted(labels) == [0] * 12 + [1] * 12 + [2] * 12
    assert labels[:12] != sorted(labels[:12])  # shuffled: the first shard is not all one class
    build(src, tmp_path / "ordered", Options(maxcount=10, shuffle_seed=None), workers=1, progress_bar=False)
    assert [s["cls"] for s in raw_samples(pattern(tmp_path / "ordered", 4))] == sorted(labels)


def test_build_resumes_after_an_interruption_and_refuses_other_input(tmp_path: Path, monkeypatch):
    src = image_folder(tmp_path / "src")
    reference = tmp_path / "reference"
    build(src, reference, Options(maxcount=10), workers=1, progress_bar=False)

    out = tmp_path / "out"
    calls = {"n": 0}
    real_encode = build_module.encode

    def dying_encode(item, options):  # the job is killed while encoding input 25
        calls["n"] += 1
        if calls["n"] == 25:
            raise RuntimeError("killed")
        return real_encode(item, options)

    monkeypatch.setattr(build_module, "encode", dying_encode)
    with pytest.raises(RuntimeError, match="killed"):
        build(src, out, Options(maxcount=10), workers=1, progress_bar=False)
    monkeypatch.setattr(build_module, "encode", real_encode)
    assert not (out / "index.json").exists()
    progress = json.loads((out / ".progress.json").read_text())
    # Results arrive in chunks: the failure surfaces at the start of its chunk, after 1 or 2 shards.
    assert progress["shards"] and all(s["samples"] == 10 for s in progress["shards"])
    assert progress["items_done"] == 10 * len(progress["shards"])

    index = build(src, out, Options(maxcount=10), workers=2, progress_bar=False)  # resumes there
    assert shard_bytes(out) == shard_bytes(reference)
    assert index["shards"] == json.loads((reference / "index.json").read_text())["shards"]
    assert build(src, out, Options(maxcount=10), workers=1, progress_bar=False)["samples"] == 36  # complete

    (src / "cat" / "new.png").write_bytes(encoded(1, size=24))  # the input changed: refuse, never mix
    with pytest.raises(UserError, match="another input or other options"):
        build(src, out, Options(maxcount=10), workers=1, progress_bar=False)
    with pytest.raises(UserError, match="another input or other options"):
        build(src, reference, Options(maxcount=20), workers=1, progress_bar=False)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        build(src, tmp_path / "foreign", Options(), workers=1, progress_bar=False)


def test_unreadable_inputs_are_skipped_and_counted(tmp_path: Path):
    src = image_folder(tmp_path / "src", per_class=3)
    (src / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    index = build(src, tmp_path / "out", Options(resize=16), workers=1, progress_bar=False)
    assert index["samples"] == 9 and index["skipped_inputs"] == 1
