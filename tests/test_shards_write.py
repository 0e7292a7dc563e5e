import json
from pathlib import Path

import pytest
from datasets import encoded, make_shards, pattern
from helpers import run_cli

from bigssl.data.decode import decode_text
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
        return {"key": sample["__key__"], "cls": int(sample["cls"]), "text": decode_text(sample),
                "jpg": "jpg" in sample}

    stream = ShardStream(resolve(shard_pattern), fields, StreamSpec(mode="exact", shuffle_buffer=0, interleave=1))
    out = []
    for micro in stream:
        data = micro["data"]
        out += [{name: (value[i] if isinstance(value, list) else value[i].item()) for name, value in data.items()}
                for i in range(len(micro["good"]))]
    return out


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

    again = run_cli("shards", str(src), str(out), timeout=120)  # never mixes two datasets
    assert again.returncode == 2 and "already contains shards" in again.stderr

    listing = tmp_path / "list.csv"
    listing.write_text("path,label,text\nfolder/cat/0.png,cat,a cat\nfolder/dog/1.png,dog,\n")
    result = run_cli("shards", str(listing), str(tmp_path / "out2"), timeout=120)
    assert result.returncode == 0, result.stderr
    samples = raw_samples(str(tmp_path / "out2" / "shard-000000.tar"))
    assert [(s["cls"], s["text"]) for s in samples] == [(0, "a cat"), (1, "")]
