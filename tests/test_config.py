import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from helpers import QUICKSTART, run_cli

from bigssl import config as config_lib
from bigssl import recipes
from bigssl.errors import ConfigError


def test_quickstart_recipe_loads_with_overrides():
    config = recipes.load(QUICKSTART, ["optim.batch_size=512", "method.temperature=0.3", "log.dir=/tmp/x"])
    assert config.name == "simclr"
    assert config.optim.batch_size == 512
    assert config.method.temperature == 0.3
    assert config.log.dir == "/tmp/x"
    # The keys scripts rely on (docs/architecture.md, "Public surface") exist under these names and
    # hold the recipe's values (seed, data, epochs), the overrides' and otherwise the defaults.
    expected = {"seed": 0, "data.train": "quickstart:train", "data.val": "quickstart:val",
                "data.samples_per_epoch": 0, "optim.batch_size": 512, "optim.epochs": 10, "optim.max_steps": 0,
                "engine.kind": "ddp", "engine.precision": "fp32", "log.dir": "/tmp/x"}
    assert {key: config_lib.get(config, key) for key in expected} == expected
    other = recipes.load(QUICKSTART, ["seed=7", "data.samples_per_epoch=640", "optim.max_steps=9",
                                         "engine.precision=bf16"])
    assert [config_lib.get(other, k) for k in ("seed", "data.samples_per_epoch", "optim.max_steps",
                                               "engine.precision")] == [7, 640, 9, "bf16"]


def test_linear_and_sqrt_lr_scaling():
    linear = recipes.load(QUICKSTART, ["optim.base_lr=0.3", "optim.batch_size=4096"])
    assert linear.optim.lr == pytest.approx(0.3 * 4096 / 256)
    sqrt = recipes.load(QUICKSTART, ["optim.base_lr=0.075", "optim.batch_size=4096", "optim.lr_scaling=sqrt"])
    assert sqrt.optim.lr == pytest.approx(0.075 * math.sqrt(4096))
    fixed = recipes.load(QUICKSTART, ["optim.lr=0.01"])
    assert fixed.optim.lr == 0.01


def test_default_log_dir_is_named_after_the_recipe():
    assert recipes.load(QUICKSTART).log.dir == str(Path("runs") / "simclr")


def test_global_batch_must_split_over_ranks():
    config = recipes.load(QUICKSTART, ["optim.batch_size=256"])
    assert config_lib.per_rank_batch(config, 4) == 64
    with pytest.raises(ConfigError, match="optim.batch_size=256 is not divisible by the world size 3"):
        config_lib.per_rank_batch(config, 3)


@pytest.mark.parametrize(("override", "named"), [
    ("optim.bach_size=3", "optim.bach_size"),
    ("optim.batch_size=many", "optim.batch_size"),
    ("method.temprature=0.1", "method.temprature"),
    ("optim.name=adam", "optim.name"),
    ("data.views.crop_scale=[0.9,0.1]", "data.views.crop_scale"),
    ("method.name=nosuchmethod", "method.name"),
])
def test_bad_config_is_rejected_naming_the_key(override: str, named: str):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        recipes.load(QUICKSTART, [override])


def test_cli_config_errors_exit_2_with_one_line(tmp_path: Path):
    for args, named in [
        ([str(QUICKSTART), "optim.bach_size=3"], "optim.bach_size"),
        ([str(QUICKSTART), "engine.precision=fp8"], "engine.precision"),
        ([str(tmp_path / "missing.yaml")], "missing.yaml"),
        ([str(QUICKSTART), "data.train=/nonexistent/shard-{0..3}.tar", f"log.dir={tmp_path}/run"],
         "/nonexistent/shard-0.tar"),
    ]:
        result = run_cli("train", *args, timeout=120)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert named in lines[-1] and lines[-1].startswith("bigssl: error:"), result.stderr
        assert "Traceback" not in result.stderr


def test_unknown_top_level_section_in_yaml(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  batch_size: 8\nschedule:\n  warmup: 1\n")
    with pytest.raises(ConfigError, match="schedule"):
        recipes.load(recipe)


def test_print_config_prints_resolved_yaml_that_loads_back(tmp_path: Path):
    result = run_cli("train", str(QUICKSTART), "optim.batch_size=512", "--print-config", timeout=120)
    assert result.returncode == 0, result.stderr
    printed = tmp_path / "printed.yaml"
    printed.write_text(result.stdout)
    assert recipes.load(printed) == recipes.load(QUICKSTART, ["optim.batch_size=512"])
    values = yaml.safe_load(result.stdout)
    assert values["optim"]["lr"] == pytest.approx(values["optim"]["base_lr"] * 512 / 256)


def test_recipes_are_read_and_checked_without_importing_torch():
    """--print-config and config errors answer before torch and timm load (seconds on a cold disk)."""
    import subprocess
    import sys

    from bigssl.methods.configs import CONFIGS

    probe = ("import sys; from bigssl.cli import main; code = main(sys.argv[1:]); "
             "heavy = sorted(m for m in ('torch', 'timm', 'webdataset', 'deepspeed') if m in sys.modules); "
             "print('HEAVY', heavy, 'CODE', code)")
    recipes = sorted((QUICKSTART.parent.parent).glob("*/*.yaml"))
    assert len(recipes) >= 15
    # A one-file method (no configs.py entry: VICReg) registers its schema as its module is
    # imported, so its recipes pay the torch import by design (bigssl/methods/schemas.py).
    listed = [r for r in recipes if yaml.safe_load(r.read_text())["method"]["name"] in CONFIGS]
    for args in ([str(QUICKSTART), "--print-config"], [str(listed[-1]), "--print-config"],
                 [str(QUICKSTART), "method.nope=1"], [str(QUICKSTART), "method.name=nope"]):
        result = subprocess.run([sys.executable, "-c", probe, "train", *args], capture_output=True, text=True,
                                timeout=120)
        assert "HEAVY [] CODE" in result.stdout, (args, result.stdout[-300:], result.stderr[-300:])
        assert ("CODE 0" in result.stdout) == ("--print-config" in args)


# ------------------------------------------------------------------------ value ranges (#18)
@pytest.mark.parametrize(("override", "message"), [
    ("optim.max_steps=-1", "optim.max_steps: must be >= 0, got -1"),  # trained 0 steps with rc 0
    ("optim.base_lr=-1", "optim.base_lr: must be > 0, got -1.0"),  # torch's "Invalid learning rate", no key
    ("optim.base_lr=nan", "optim.base_lr: must be a finite number, got nan"),
    ("optim.lr=inf", "optim.lr: must be a finite number, got inf"),
    ("eval.knn_k=0", "eval.knn_k: must be >= 1, got 0"),  # printed a kNN of 0.1000
    ("optim.warmup_epochs=-1", "optim.warmup_epochs: must be >= 0, got -1.0"),
    ("optim.momentum=1", "optim.momentum: must be in [0, 1), got 1.0"),
    ("data.views.crop_scale=[0,1]", "data.views.crop_scale: every value must be in (0, 1], got [0.0, 1.0]"),
    ("data.views.blur_sigma=[0.1,.inf]", "data.views.blur_sigma: must be a finite number"),
    ("data.views.jitter=[0.4,0.4,0.4,0.7]", "data.views.jitter: the hue (4th value) must be in [0, 0.5]"),
    ("method.temperature=0", "method.temperature: must be > 0, got 0.0"),
    ("model.backbone_args.drop_path_rate=.nan", "model.backbone_args.drop_path_rate: must be a finite number"),
    ("seed=123456789012345678901234", "seed: 123456789012345678901234 does not fit in 64 bits"),
    ("optim.base_lr=1e308", "optim.base_lr: scaled by the batch (linear) it gives lr inf"),
])
def test_numeric_values_out_of_range_are_refused_naming_the_key(override: str, message: str):
    with pytest.raises(ConfigError) as caught:
        recipes.load(QUICKSTART, [override])
    assert str(caught.value).startswith(message)


def _numeric_fields(schema: type, prefix: str) -> Iterator[str]:
    """Dotted keys of the int/float (or list of them) fields of a schema and its sections."""
    from dataclasses import fields, is_dataclass

    instance = schema()
    for item in fields(instance):
        value, key = getattr(instance, item.name), f"{prefix}{item.name}"
        if is_dataclass(value):
            yield from _numeric_fields(type(value), key + ".")
        elif any(word in str(item.type) for word in ("int", "float")):
            yield key


def test_every_numeric_field_of_every_schema_has_a_range():
    """A new numeric field needs its line in bigssl/config_ranges.py: this names the ones without."""
    from bigssl.config_ranges import bound_of
    from bigssl.methods.configs import CONFIGS

    keys = set(_numeric_fields(config_lib.Config, ""))
    for schema in CONFIGS.values():
        keys |= set(_numeric_fields(schema, "method."))
    assert "optim.base_lr" in keys and "method.queue_size" in keys and "data.views.crop_scale" in keys
    assert sorted(key for key in keys if bound_of(key) is None) == []


def test_every_recipe_and_view_policy_is_in_range():
    from bigssl.methods.policies import POLICIES

    for recipe in sorted(QUICKSTART.parent.parent.glob("*/*.yaml")):
        recipes.load(recipe)
    for policy in POLICIES:
        recipes.load(None, [f"data.views.policy={policy}"])


# ---------------------------------------------------------------------- recipe files (#18)
@pytest.mark.parametrize(("content", "message"), [
    (b"optim:\n  batch_size: 8\nname: caf\xe9\n", "r.yaml:3: not UTF-8 text (byte 0xe9 at offset 32)"),
    (b"optim:\n  batch_size: [1, 2\nlog: {}\n", "r.yaml:3:4: not valid YAML: expected ',' or ']'"),
    (b"optim:\n\tbatch_size: 3\n", "r.yaml:2:1: not valid YAML: found character '\\t'"),
    (b"optim:\n  batch_size: 8\n  epochs: 2\n  batch_size: 16\n",
     "r.yaml:4:3: not valid YAML: duplicate key 'batch_size' (first given on line 2)"),
    (b"log: {}\nlog: {every_steps: 2}\n", "r.yaml:2:1: not valid YAML: duplicate key 'log'"),
    (b"seed: 1\nname: a\x00b\n", "r.yaml:2:8: not valid YAML: unacceptable character #x0000"),
    (b"optim: 3\n", "optim: is a section; set its keys (optim.KEY=VALUE), got 3"),
    (b"- 1\n- 2\n", "r.yaml: a recipe must be a mapping of sections, got list"),
])
def test_recipe_errors_name_the_file_and_place(tmp_path: Path, content: bytes, message: str):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        recipes.load(recipe)
    assert str(caught.value).removeprefix(str(tmp_path) + "/").startswith(message), str(caught.value)


def test_yaml_merge_keys_dates_and_empty_sections_still_read(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: 2024-05-01\nlog:\noptim:\n  <<: {batch_size: 8, epochs: 3}\n  batch_size: 16\n")
    config = recipes.load(recipe)
    assert (config.name, config.optim.batch_size, config.optim.epochs) == ("2024-05-01", 16, 3)
    assert recipes.load(recipe, []).log.every_steps == 10
    with pytest.raises(ConfigError, match="is a directory"):
        recipes.load(tmp_path)


@pytest.mark.parametrize(("overrides", "message"), [
    (["optim=3"], "optim: is a section; set its keys (optim.KEY=VALUE), got 3"),
    # The 3 was dropped silently: the later override turned `optim` back into a mapping.
    (["optim=3", "optim.max_steps=2"], "optim: is a section"),
    (["data.views=[1, 2]"], "data.views: is a section"),
    (["model.backbone_args.depth=3", "model.backbone_args.depth.x=1"],
     "override model.backbone_args.depth.x: conflicts with the override of model.backbone_args.depth"),
    (["optim..lr=1"], "override 'optim..lr=1': 'optim..lr' is not a dotted key"),
    (["optim.name=\udcff"], "override optim.name: not valid UTF-8 text"),  # argv bytes that are not UTF-8
    (["optim.lr=${nope}"], "optim.lr: Interpolation key 'nope' not found"),
])
def test_bad_overrides_are_refused_naming_the_key(overrides: list[str], message: str):
    with pytest.raises(ConfigError) as caught:
        recipes.load(QUICKSTART, overrides)
    assert str(caught.value).startswith(message), str(caught.value)


def test_duplicate_overrides_last_wins_and_print_config_says_so(capsys: pytest.CaptureFixture):
    from bigssl.cli import main

    overrides = ["optim.batch_size=256", "optim.epochs=3", "optim.batch_size=512"]
    assert recipes.load(QUICKSTART, overrides).optim.batch_size == 512
    assert main(["train", str(QUICKSTART), *overrides, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# optim.batch_size is overridden 2 times (256, 512): the last one is used\n")
    assert yaml.safe_load(printed)["optim"]["batch_size"] == 512  # still YAML that loads back


def test_log_dir_must_be_a_directory(tmp_path: Path):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    with pytest.raises(ConfigError, match=r"^log.dir: .*notes.txt is a file; a run directory is needed"):
        recipes.load(QUICKSTART, [f"log.dir={taken}"])  # was FileExistsError after torch had loaded
    with pytest.raises(ConfigError, match=r"^log.dir: .*notes.txt/run cannot be created: .*notes.txt is a file"):
        recipes.load(QUICKSTART, [f"log.dir={taken}/run"])


def test_a_config_error_fails_before_torch_is_imported():
    """What made a config error slow (8-25 s under load) was importing torch, timm and DeepSpeed
    before reading the recipe; the error must come without any of them. Asserted on the imports,
    not on a clock, which a loaded machine would fail."""
    import subprocess
    import sys

    probe = ("import sys; from bigssl.cli import main; code = main(sys.argv[1:]); "
             "heavy = sorted(m for m in ('torch', 'timm', 'webdataset', 'deepspeed', 'numpy') if m in sys.modules); "
             "print('HEAVY', heavy, 'CODE', code)")
    result = subprocess.run([sys.executable, "-c", probe, "train", str(QUICKSTART), "optim.max_steps=-1"],
                            capture_output=True, text=True, timeout=120)
    assert "HEAVY [] CODE 2" in result.stdout, result.stdout + result.stderr
    assert result.stderr == "bigssl: error: optim.max_steps: must be >= 0, got -1\n"


@pytest.mark.parametrize(("overrides", "message"), [
    (["optim.lr_schedule=cos"], "optim.lr_schedule: 'cos' is not one of cosine, step"),
    (["optim.lr_schedule=step", "optim.lr_milestones=[60,30]"], "optim.lr_milestones: [60.0, 30.0] must be increasing"),
    (["method.name=instdisc", "method.loss=hinge"], "method.loss: 'hinge' is not one of nce, softmax"),
])
def test_choices_are_checked_with_the_config_before_torch(overrides: list[str], message: str):
    with pytest.raises(ConfigError) as caught:
        recipes.load(None, overrides)  # they were found only once the optimizer or method was built
    assert str(caught.value).startswith(message)
