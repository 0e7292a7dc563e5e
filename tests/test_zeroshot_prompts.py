"""Zero-shot class names and templates: OpenAI's ImageNet lists as shipped, what `auto`
chooses, files, and the classifier as CLIP builds it (mean of normalised prompt embeddings)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import encoded
from engine_cases import make_config

from bigssl.data.shards import resolve
from bigssl.data.write import Sample, write_shards
from bigssl.errors import UserError
from bigssl.eval import prompts
from bigssl.eval.zeroshot import prompts_for, text_classifier
from bigssl.methods import build

TINY_TEXT = ["method.embed_dim=8", "method.context_length=40", "method.text_width=16", "method.text_layers=1",
             "method.text_heads=2", "model.channels_last=false"]
WORDNET_IDS = [f"n{1440764 + 7 * i:08d}" for i in range(1000)]  # sorted, as an ImageNet class-folder tree lists them


def test_imagenet_lists_are_openais_1000_names_and_80_templates():
    names, templates = prompts.imagenet_names(), prompts.imagenet_templates()
    assert len(names) == 1000 and len(templates) == 80
    # Spot checks against the published lists (CLIP's Prompt_Engineering_for_ImageNet notebook).
    assert names[:3] == ["tench", "goldfish", "great white shark"] and names[-1] == "toilet paper"
    assert names[517] == "construction crane" and names[134] == "crane bird"  # CLIP §3.1.4: the two cranes told apart
    assert len(set(names)) == 998  # 'missile' and 'sunglasses' name two classes each, as published
    assert templates[0] == "a bad photo of a {}." and templates[-1] == "a tattoo of the {}."
    assert all(t.count("{}") == 1 for t in templates) and len(set(templates)) == 80


def test_auto_keeps_an_index_s_names_and_switches_to_imagenet_for_its_wordnet_ids():
    other = prompts.prompt_set(["t-shirt/top", "coat"], "auto", "auto", "--val")
    assert other.names == ("t-shirt or top", "coat") and other.templates == prompts.GENERIC_TEMPLATES
    imagenet = prompts.prompt_set(WORDNET_IDS, "auto", "auto", "--val")
    assert list(imagenet.names) == prompts.imagenet_names() and list(imagenet.templates) == prompts.imagenet_templates()
    shuffled = WORDNET_IDS[1:] + WORDNET_IDS[:1]  # labels that are not ImageNet's class numbers
    assert prompts.prompt_set(shuffled, "auto", "auto", "--val").names == tuple(shuffled)
    with pytest.raises(UserError, match="out of their sorted order"):
        prompts.prompt_set(shuffled, "imagenet", "auto", "--val")
    with pytest.raises(UserError, match=r"^--classnames: 1000 class names, but the index.json of --val records 2"):
        prompts.prompt_set(["a", "b"], "imagenet", "auto", "--val")
    with pytest.raises(UserError, match="no index.json"):
        prompts.prompt_set(None, "auto", "auto", "--val")
    explicit = prompts.prompt_set(None, "imagenet", "auto", "--val")  # no index: the labels are checked later
    assert len(explicit.names) == 1000 and len(explicit.templates) == 80


def test_imagenet_val_shards_from_class_folders_get_the_imagenet_lists(tmp_path: Path):
    samples = (Sample(encoded(i), "png", label) for i, label in enumerate((0, 517, 999)))
    write_shards(samples, tmp_path / "val", classes=WORDNET_IDS, maxcount=10)  # as `bigssl shards` records them
    chosen = prompts_for(resolve(str(tmp_path / "val" / "shard-000000.tar"), "--val"), "--val")
    assert chosen.names[517] == "construction crane" and len(chosen.templates) == 80
    assert chosen.origin == "OpenAI's ImageNet-1k class names (1000), OpenAI's ImageNet templates (80)"


def test_names_and_templates_from_files(tmp_path: Path):
    names, templates = tmp_path / "names.txt", tmp_path / "templates.txt"
    names.write_text("# my classes\nt-shirt/top\n\ncoat\n")
    templates.write_text("a {} photo.\n# not a template\nart of the {}, {{sic}}.\n")
    chosen = prompts.prompt_set(["x", "y"], str(names), str(templates), "--val")
    assert chosen.names == ("t-shirt/top", "coat")  # a file's names are used as written
    assert chosen.templates == ("a {} photo.", "art of the {}, {{sic}}.")
    assert prompts.prompt_set(WORDNET_IDS[:2], str(names), "auto", "--val").templates == prompts.GENERIC_TEMPLATES
    with pytest.raises(UserError, match="3 classes"):
        prompts.prompt_set(["x", "y", "z"], str(names), "auto", "--val")
    templates.write_text("a photo of a dog.\n")
    with pytest.raises(UserError, match=r"template 'a photo of a dog.' has no '\{\}'"):
        prompts.prompt_set(None, str(names), str(templates), "--val")
    with pytest.raises(UserError, match="cannot read 'missing.txt'"):
        prompts.prompt_set(None, "missing.txt", "auto", "--val")


def test_classifier_is_the_renormalised_mean_of_normalised_prompt_embeddings():
    torch.manual_seed(0)
    method = build(make_config("clip", *TINY_TEXT)).eval()
    names = ["cat", "red fish", "t-shirt"]
    templates = ("a photo of a {}.", "itap of my {}.", "a {} in a video game.")
    got = text_classifier(method, names, templates)
    with torch.no_grad():  # one text at a time, the formula of CLIP §3.1.4 written out
        expected, plain_means = [], []
        for name in names:
            embeddings = torch.stack([method.encode_text([t.replace("{}", name)])[0] for t in templates])
            unit = embeddings / embeddings.norm(dim=1, keepdim=True)
            mean = unit.mean(dim=0)
            expected.append(mean / mean.norm())
            plain = embeddings.mean(dim=0)
            plain_means.append(plain / plain.norm())
    expected = torch.stack(expected)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(3), rtol=1e-5, atol=0)
    # Normalising before averaging matters here, so the comparison above can tell the two apart.
    assert (torch.stack(plain_means) - expected).abs().max() > 1e-3
    assert F.cosine_similarity(got[0], got[1], dim=0) < 0.99  # classes are not one vector
