"""CLIP's pieces: the byte tokenizer, the causal text tower read at END, the clamped logit scale,
captioned quickstart shards, and zero-shot scoring in the trainer and offline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from engine_cases import make_config
from helpers import REPO, run_cli

from bigssl.data import quickstart
from bigssl.data.decode import BadSample, decode_text
from bigssl.data.shards import resolve
from bigssl.eval.prompts import GENERIC_TEMPLATES
from bigssl.eval.zeroshot import index_classes
from bigssl.methods import build
from bigssl.models.text import END, PAD, START, ByteTokenizer, TextTransformer

TINY_TEXT = ["method.embed_dim=8", "method.context_length=16", "method.text_width=16", "method.text_layers=1",
             "method.text_heads=2"]


def test_byte_tokens_round_trip_and_always_end():
    tokenizer = ByteTokenizer(context_length=8)
    tokens = tokenizer(["ab", "é", "a much longer caption"])
    assert tokens[0].tolist() == [START, ord("a") + 1, ord("b") + 1, END, PAD, PAD, PAD, PAD]
    assert tokens[1].tolist()[:4] == [START, 0xC3 + 1, 0xA9 + 1, END]  # UTF-8 bytes of é
    assert tokens[2].tolist()[-1] == END and ByteTokenizer.decode(tokens[2]) == "a much"  # cut, END kept
    assert ByteTokenizer.decode(tokens[1]) == "é"


def test_text_features_are_read_at_end_and_ignore_what_follows():
    torch.manual_seed(0)
    tower = TextTransformer(width=16, layers=2, heads=2, context_length=12).eval()
    tokens = ByteTokenizer(12)(["a coat", "a bag"])
    junk = tokens.clone()
    junk[0, 8:] = torch.randint(1, 257, (4,))  # after END (position 7): causal attention cannot see it
    with torch.no_grad():
        clean, noisy = tower(tokens), tower(junk)
        changed = tokens.clone()
        changed[0, 3] = ord("x") + 1  # before END: it must matter
        moved = tower(changed)
    torch.testing.assert_close(clean, noisy, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(clean[0], moved[0], atol=1e-4)
    assert clean.shape == (2, 16)


def test_logit_scale_is_clamped_at_100_without_gradient_above():
    method = build(make_config("clip", *TINY_TEXT, "model.channels_last=false"))
    batch = {"views": [torch.rand(1, 4, 3, 32, 32)], "text": ["a coat", "a bag", "a shirt", "a dress"]}
    assert method.scale().item() == pytest.approx(1 / 0.07, rel=1e-6)  # CLIP's initial temperature
    method(batch, 0).loss.backward()
    assert method.logit_scale.grad.abs().item() > 0
    method.zero_grad()
    with torch.no_grad():
        method.logit_scale.fill_(math.log(200.0))
    out = method(batch, 0)
    assert out.metrics["logit_scale"].item() == pytest.approx(100.0)
    out.loss.backward()
    assert method.logit_scale.grad.item() == 0.0


def test_captioned_quickstart_names_each_images_class():
    shards = quickstart.materialize("captions")
    index = json.loads((shards / "index.json").read_text())
    assert index["samples"] == 10_000 and len(index["classes"]) == 10
    import tarfile

    with tarfile.open(shards / "shard-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()[:60]}
    keys = {name.split(".")[0] for name in members}
    for key in keys:
        label = int(members[f"{key}.cls"])
        text = members[f"{key}.txt"].decode()
        assert quickstart.readable(index["classes"][label]) in text
    with pytest.raises(BadSample):
        decode_text({"png": b""})  # an image-text pair without its caption is skipped, not trained on
    with pytest.raises(BadSample):
        decode_text({"png": b"", "txt": b" \n"})  # nor with a blank one (img2dataset's missing caption)


def test_trainer_and_offline_eval_score_zero_shot_identically(tmp_path: Path):
    run = tmp_path / "run"
    small = ["model.backbone_args.channels=[8,16,32,64]", "optim.batch_size=32", "data.workers=1",
             "eval.knn_pixels=false", "log.every_steps=1", "optim.max_steps=3", *TINY_TEXT]
    result = run_cli("train", str(REPO / "recipes" / "quickstart" / "clip.yaml"), *small, f"log.dir={run}")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    at_end = next(r for r in records if "zeroshot/top1" in r)
    baseline = next(r for r in records if "zeroshot/random_init_top1" in r)
    assert at_end["zeroshot/top1"] <= at_end["zeroshot/top5"]
    # The random-init baseline, recomputed in this process: the method as the trainer builds it (the
    # run's config, its seed, no step taken), scored on the same images with the same prompts. (Any
    # random init of this tiny CLIP ranks the classes alike for every image: chance, 0.1 / 0.5 on
    # the balanced val set; a baseline taken from another score or network would not be.)
    from bigssl import recipes
    from bigssl.data.views import Photometric
    from bigssl.eval.zeroshot import zero_shot

    config = recipes.load(run / "config.yaml")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the run's process (tests/helpers.py worker_env): the same rounding
    try:
        torch.manual_seed(config.seed)
        fresh = build(config)
        scores = zero_shot(fresh, resolve("quickstart:val"), "data.val", config.data.views,
                           Photometric(config.data.views).normalize, config.eval.batch_size, 0, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert (baseline["zeroshot/random_init_top1"], baseline["zeroshot/random_init_top5"]) == (
        scores["top1"], scores["top5"])
    assert all("logit_scale" in r for r in records if "loss" in r)
    assert "zero-shot top-1 (class-name prompts)" in result.stderr
    offline = run_cli("eval", "zeroshot", str(run), "--val", "quickstart:val", "--workers", "1")
    assert offline.returncode == 0, offline.stderr
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["eval/zeroshot_top1"] == at_end["zeroshot/top1"]
    assert last["eval/zeroshot_top5"] == at_end["zeroshot/top5"]
    # The same names and templates given as files score the same; ImageNet's 1000 names do not fit.
    names, templates = tmp_path / "names.txt", tmp_path / "templates.txt"
    names.write_text("".join(quickstart.readable(c) + "\n" for c in index_classes(resolve("quickstart:val"))))
    templates.write_text("# the generic ones\n" + "".join(t + "\n" for t in GENERIC_TEMPLATES))
    from_files = run_cli("eval", "zeroshot", str(run), "--val", "quickstart:val", "--workers", "1",
                         "--classnames", str(names), "--templates", str(templates))
    assert from_files.returncode == 0, from_files.stderr
    assert f"class names from {names} (10), templates from {templates} (4)" in from_files.stdout
    again = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert (again["eval/zeroshot_top1"], again["eval/zeroshot_top5"]) == (last["eval/zeroshot_top1"],
                                                                          last["eval/zeroshot_top5"])
    imagenet = run_cli("eval", "zeroshot", str(run), "--val", "quickstart:val", "--classnames", "imagenet")
    assert imagenet.returncode == 2 and "1000 class names, but the index.json of --val records 10" in imagenet.stderr
    not_clip = run_cli("eval", "zeroshot", str(tmp_path / "missing"), "--val", "quickstart:val")
    assert not_clip.returncode == 2 and len(not_clip.stderr.strip().splitlines()) == 1
