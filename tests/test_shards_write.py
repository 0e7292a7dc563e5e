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


def members_of(shard: Path) -> list[dict[str, bytes]]:
    from bigssl.data import tar

    with shard.open("rb") as handle:
        return list(tar.samples(handle))


def test_a_file_list_gets_what_training_reads(tmp_path: Path, capsys: pytest.CaptureFixture):
    """From a CSV/JSONL list any extension became a member: .gif and .tif ones the reader never
    uses (all `no_image` at train time), an input named *.cls replaced its sample's label, and
    the command reported success. Inputs are now decode-checked as training decodes them, and
    formats training does not read become PNG."""
    from bigssl.cli import main
    from bigssl.data.decode import decode_array, image_bytes

    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(encoded(10))
    (images / "b.gif").write_bytes(encoded(60, fmt="GIF"))
    (images / "c.tif").write_bytes(encoded(110, fmt="TIFF"))
    (images / "d.cls").write_bytes(encoded(160, fmt="JPEG"))  # a JPEG under an unlucky name
    (images / "e.jpg").write_bytes(b"a text file, not an image")
    listing = tmp_path / "list.jsonl"
    listing.write_text("".join(json.dumps({"path": f"images/{name}", "label": label}) + "\n"
                               for label, name in enumerate(["a.png", "b.gif", "c.tif", "d.cls", "e.jpg"])))
    out = tmp_path / "out"
    assert main(["shards", str(listing), str(out), "--workers", "1", "--no-shuffle", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{out}: 4 samples in 1 shards, 1 unreadable inputs skipped, 2 inputs converted to PNG\n"
    assert "skipping " in captured.err and "e.jpg" in captured.err
    assert "converting " in captured.err and "b.gif (GIF, a format training does not read) to PNG" in captured.err

    samples = members_of(out / "shard-000000.tar")
    assert [sorted(k for k in s if k != "__key__") for s in samples] == [["cls", "png"], ["cls", "png"],
                                                                         ["cls", "png"], ["cls", "jpg"]]
    assert [int(s["cls"]) for s in samples] == [0, 1, 2, 3]  # d.cls kept its label
    pixels = [int(decode_array(image_bytes(s))[0, 0, 0]) for s in samples]
    assert pixels[:3] == [10, 60, 110] and abs(pixels[3] - 160) <= 2  # the GIF and TIFF losslessly
    index = json.loads((out / "index.json").read_text())
    assert (index["skipped_inputs"], index["converted_inputs"]) == (1, 2)


def test_a_damaged_image_is_skipped_without_resize_too(tmp_path: Path):
    src = image_folder(tmp_path / "src", per_class=2)
    jpeg = encoded(5, size=24, fmt="JPEG")
    (src / "cat" / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # it was copied into the shard as is
    index = build(src, tmp_path / "out", Options(), workers=1, progress_bar=False)
    assert index["samples"] == 6 and index["skipped_inputs"] == 1
