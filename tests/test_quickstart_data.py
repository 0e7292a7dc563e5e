"""The shipped quickstart subset is exactly what tools/make_quickstart_subset.py makes from Debian's files."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from bigssl.data import quickstart
from bigssl.data.decode import decode_rgb, image_bytes
from bigssl.data.shards import resolve
from bigssl.data.stream import ShardStream, StreamSpec

SOURCE = Path("/usr/share/datasets/fashion-mnist")
TOOL = Path(__file__).resolve().parents[1] / "tools" / "make_quickstart_subset.py"


def test_shipped_file_is_small_and_balanced():
    assert quickstart.DATA_FILE.stat().st_size <= 6 * 1024 * 1024
    assert (quickstart.DATA_FILE.parent / "FASHION_MNIST_LICENSE.txt").read_text().count("MIT License") == 1
    arrays = quickstart.load_arrays()
    assert arrays["train_images"].shape == (10000, 28, 28) and arrays["val_images"].shape == (2000, 28, 28)
    assert np.bincount(arrays["train_labels"]).tolist() == [1000] * 10
    assert np.bincount(arrays["val_labels"]).tolist() == [200] * 10


@pytest.mark.skipif(not SOURCE.is_dir(), reason="apt-get install dataset-fashion-mnist to compare with the source")
def test_shipped_subset_matches_the_debian_files():
    spec = importlib.util.spec_from_file_location("make_quickstart_subset", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    arrays = quickstart.load_arrays()
    for split, prefix, per_class in [("train", "train", 1000), ("val", "t10k", 200)]:
        images, labels = tool.balanced_subset(tool.read_idx(SOURCE / f"{prefix}-images-idx3-ubyte.gz"),
                                              tool.read_idx(SOURCE / f"{prefix}-labels-idx1-ubyte.gz"), per_class)
        assert np.array_equal(arrays[f"{split}_images"], images)
        assert np.array_equal(arrays[f"{split}_labels"], labels)


def test_quickstart_shards_are_written_once_and_read_back():
    train, val = resolve("quickstart:train"), resolve("quickstart:val")
    assert train.total == 10000 and val.total == 2000 and len(train.shards) == 10
    def shape_and_label(sample: dict) -> dict:
        return {"shape": torch.tensor(decode_rgb(image_bytes(sample)).shape), "label": int(sample["cls"])}

    micros = list(ShardStream(val, shape_and_label, StreamSpec(mode="exact", shuffle_buffer=0)))
    assert torch.bincount(torch.cat([m["data"]["label"] for m in micros])).tolist() == [200] * 10
    assert (torch.cat([m["data"]["shape"] for m in micros]) == torch.tensor([3, 28, 28])).all()
    assert resolve("quickstart:train") == train  # the second use reuses the shards
