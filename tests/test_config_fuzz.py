"""Hundreds of generated malformed recipes and overrides, each of which must end with exit code 2
and one stderr line that names the key or the file: wrong types, values out of range, non-finite
numbers, unknown keys, keys given twice, sections given a value, broken YAML, bad encodings.

All cases run through `bigssl.cli.main` in one subprocess: a fresh interpreter shows that none of
them imports torch, timm or DeepSpeed (a config error answers in well under a second), and one
start instead of hundreds keeps the test at a few seconds.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

from helpers import QUICKSTART, REPO

from bigssl import config as config_lib
from bigssl.config_ranges import Bound, bound_of
from bigssl.methods.configs import CONFIGS

RUNNER = r"""
import contextlib, io, json, signal, sys, time, traceback

from bigssl.cli import main

with open(sys.argv[1]) as handle:
    cases = json.load(handle)
results = []
for case in cases:
    err = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["train", case["recipe"], *case["overrides"]])
    except BaseException:  # SystemExit included: nothing may escape main()
        code = "escaped"
        err.write(traceback.format_exc())
    results.append({"code": code, "stderr": err.getvalue(), "seconds": time.perf_counter() - start,
                    # train installs its stop-signal handler first: a config error must take it back
                    "restored": signal.getsignal(signal.SIGTERM) is signal.SIG_DFL})
heavy = sorted(name for name in ("torch", "timm", "webdataset", "deepspeed") if name in sys.modules)
with open(sys.argv[2], "w") as handle:
    json.dump({"results": results, "heavy": heavy}, handle)
"""


@dataclass
class Case:
    kind: str
    named: str  # what the error line must name: the key or the recipe file
    overrides: list[str] = field(default_factory=list)
    recipe: str = str(QUICKSTART)


def typed_fields(schema: object, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, type text) of every leaf field of a schema instance."""
    for item in fields(schema):
        value = getattr(schema, item.name)
        if is_dataclass(value):
            yield from typed_fields(value, f"{prefix}{item.name}.")
        else:
            yield f"{prefix}{item.name}", str(item.type)


def core_fields() -> list[tuple[str, str]]:
    return [(key, kind) for key, kind in typed_fields(config_lib.Config()) if not key.startswith("method.")]


def method_fields() -> list[tuple[str, str, str]]:
    """(method name, dotted key, type text) of every method's own numeric field."""
    return [(name, key, kind) for name, schema in CONFIGS.items() for key, kind in typed_fields(schema(), "method.")
            if key != "method.name"]


def wrong_types() -> list[Case]:
    cases = []
    for key, kind in core_fields():
        if kind.startswith("list"):
            bad = ["3", "{a: 1}"]
        elif kind.startswith("dict"):
            bad = ["3"]
        elif kind.startswith(("int", "float", "bool")):
            bad = ["word", "[1, 2]"] + (["1.5"] if kind.startswith("int") else [])
        else:  # str: any scalar converts, a list does not
            bad = ["[1, 2]"]
        cases += [Case("type", key, [f"{key}={value}"]) for value in bad]
    return cases


def outside(bound: Bound, integer: bool) -> list[float]:
    """Values just outside `bound` on each side it has."""
    values = []
    if bound.low is not None:
        values.append(bound.low if bound.open_low else bound.low - (1 if integer else 0.5))
    if bound.high is not None:
        values.append(bound.high if bound.open_high else bound.high + (1 if integer else 0.5))
    return values


def out_of_range(bare: str) -> list[Case]:
    cases = []
    for key, kind in core_fields():
        bound = bound_of(key)
        if bound is None:
            continue
        integer = "int" in kind
        for value in outside(bound, integer):
            text = str(int(value)) if integer else repr(float(value))
            cases.append(Case("range", key, [f"{key}=[{text}]" if kind.startswith("list") else f"{key}={text}"]))
    for name, key, kind in method_fields():
        bound = bound_of(key)
        for value in outside(bound, "int" in kind) if bound else []:
            text = str(int(value)) if "int" in kind else repr(float(value))
            cases.append(Case("range", key, [f"method.name={name}", f"{key}={text}"], recipe=bare))
    return cases


def non_finite(bare: str) -> list[Case]:
    cases = []
    for key, kind in core_fields():
        if "float" not in kind:
            continue
        for value in ("nan", "inf", "-inf"):
            cases.append(Case("nonfinite", key, [f"{key}=[{value}]" if kind.startswith("list") else f"{key}={value}"]))
    for name, key, kind in method_fields():
        if "float" in kind:
            cases.append(Case("nonfinite", key, [f"method.name={name}", f"{key}=nan"], recipe=bare))
    cases.append(Case("nonfinite", "model.backbone_args.drop_path_rate", ["model.backbone_args.drop_path_rate=.inf"]))
    return cases


def unknown_keys(rng: random.Random) -> list[Case]:
    cases = []
    keys = [key for key, _ in core_fields()]
    for key in rng.sample(keys, 20):
        section, _, name = key.rpartition(".")
        typo = name[:-1] if len(name) > 2 else name + "x"
        wrong = f"{section}.{typo}" if section else typo
        cases.append(Case("unknown", wrong, [f"{wrong}=1"]))
    for section in ("schedule", "optimizer", "datta"):
        cases.append(Case("unknown", section, [f"{section}.lr=1"]))
    cases.append(Case("unknown", "method.nope", ["method.nope=1"]))
    return cases


def recipe_cases(root: Path, rng: random.Random) -> list[Case]:
    texts: dict[str, bytes] = {
        "dup_top.yaml": b"optim:\n  epochs: 2\nlog: {}\noptim:\n  epochs: 3\n",
        "dup_nested.yaml": b"optim:\n  batch_size: 8\n  epochs: 2\n  batch_size: 16\n",
        "dup_views.yaml": b"data:\n  views:\n    size: 16\n    size: 32\n",
        "dup_flow.yaml": b"log: {every_steps: 1, every_steps: 2}\n",
        "dup_method.yaml": b"method:\n  name: simclr\n  temperature: 0.1\n  temperature: 0.5\n",
        "latin1.yaml": "name: café\n".encode("latin-1"),
        "utf16.yaml": "optim:\n  epochs: 2\n".encode("utf-16"),
        "garbage.yaml": bytes(rng.randrange(128, 256) for _ in range(64)),
        "nul.yaml": b"name: a\x00b\n",
        "syntax_bracket.yaml": b"optim:\n  betas: [0.9, 0.99\n",
        "syntax_tab.yaml": b"optim:\n\tepochs: 2\n",
        "syntax_indent.yaml": b"optim:\n  epochs: 2\n   batch_size: 8\n",
        "syntax_quote.yaml": b"name: 'open\n",
        "python_tag.yaml": b"seed: !!python/object/apply:os.system ['true']\n",
        "list.yaml": b"- optim\n- data\n",
        "scalar.yaml": b"just words\n",
        "section_scalar.yaml": b"optim: 3\n",
        "section_list.yaml": b"data:\n  views: [1, 2]\n",
        "nonfinite.yaml": b"optim:\n  base_lr: .nan\n",
        "range.yaml": b"optim:\n  max_steps: -5\n",
        "type.yaml": b"optim:\n  batch_size: many\n",
        "unknown.yaml": b"optim:\n  warmup: 3\n",
        "int_key.yaml": b"optim:\n  1: 2\n",
    }
    named = {"section_scalar.yaml": "optim", "section_list.yaml": "data.views", "nonfinite.yaml": "optim.base_lr",
             "range.yaml": "optim.max_steps", "type.yaml": "optim.batch_size", "unknown.yaml": "optim.warmup",
             "int_key.yaml": "optim.1"}
    cases = []
    for name, content in texts.items():
        path = root / name
        path.write_bytes(content)
        cases.append(Case("recipe", named.get(name, name), recipe=str(path)))
    cases.append(Case("recipe", "missing.yaml", recipe=str(root / "missing.yaml")))
    cases.append(Case("recipe", str(root), recipe=str(root)))  # a directory
    return cases


def override_cases(root: Path) -> list[Case]:
    taken = root / "a-file"
    taken.write_text("not a directory")
    return [
        Case("section", "optim", ["optim=3"]),
        Case("section", "optim", ["optim=3", "optim.max_steps=2"]),  # used to drop the 3 silently
        Case("section", "data.views", ["data.views=[1]"]),
        Case("section", "model.projector", ["model.projector=null", "model.projector=5"]),
        Case("conflict", "model.backbone_args.depth", ["model.backbone_args.depth=3", "model.backbone_args.depth.x=1"]),
        Case("encoding", "optim.name", ["optim.name=\udcff\udcfe"]),  # argv bytes that are not UTF-8
        Case("encoding", "data.train", ["data.train=/data/\udce9t\udce9/{0..3}.tar"]),
        Case("syntax", "optim..lr", ["optim..lr=1"]),
        Case("syntax", "optim.lr", ["optim.lr"]),
        Case("syntax", "optim.lr", ["optim.lr=${"]),
        Case("syntax", "optim.lr", ["optim.lr=${nope}"]),
        Case("syntax", "=3", ["=3"]),
        Case("files", "log.dir", [f"log.dir={taken}"]),
        Case("files", "log.dir", [f"log.dir={taken}/run"]),
        Case("split", "optim.batch_size", ["optim.batch_size=10"]),
    ]


def all_cases(root: Path) -> list[Case]:
    """Every hand-written case, and a seeded sample of 220 generated ones (of about 480: each
    config load takes OmegaConf some 40 ms here, so all of them would double the test's time)."""
    rng = random.Random(18)
    bare = root / "bare.yaml"  # no method section: any method.name fits it
    bare.write_text("name: fuzz\n")
    generated = wrong_types() + out_of_range(str(bare)) + non_finite(str(bare))
    cases = rng.sample(generated, k=220)
    return cases + unknown_keys(rng) + recipe_cases(root, rng) + override_cases(root)


def test_malformed_configs_exit_2_with_one_line_naming_the_key(tmp_path: Path):
    cases = all_cases(tmp_path)
    assert len(cases) >= 200
    # 'split': a batch of 10 over 4 ranks (the launcher's variables) is a config error too.
    (tmp_path / "cases.json").write_text(json.dumps([{"recipe": c.recipe, "overrides": c.overrides} for c in cases]))
    env = {"PATH": "/usr/bin:/bin", "RANK": "0", "WORLD_SIZE": "4", "BIGSSL_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path / "cases.json"), str(tmp_path / "out.json")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out.json").read_text())
    failures = []
    for case, got in zip(cases, report["results"], strict=True):
        lines = got["stderr"].splitlines()
        good = (got["code"] == 2 and len(lines) == 1 and lines[0].startswith("bigssl: error: ")
                and case.named in lines[0] and "Traceback" not in got["stderr"] and got["restored"])
        if not good:
            failures.append(f"{case.kind} {ascii(case.overrides)} {Path(case.recipe).name}: code {got['code']}, "
                            f"stderr {got['stderr'][-400:]!r}")
    assert not failures, f"{len(failures)} of {len(cases)}:\n" + "\n".join(failures[:40])
    assert report["heavy"] == []  # no case imported torch, timm, webdataset or DeepSpeed
    slowest = max(got["seconds"] for got in report["results"])
    assert slowest < 1.0, f"the slowest case took {slowest:.2f} s"
