import math
from pathlib import Path

import pytest
import yaml
from helpers import QUICKSTART, run_cli

from bigssl import config as config_lib
from bigssl.errors import ConfigError


def test_quickstart_recipe_loads_with_overrides():
    config = config_lib.load(QUICKSTART, ["optim.batch_size=512", "method.temperature=0.3", "log.dir=/tmp/x"])
    assert config.name == "simclr"
    assert config.optim.batch_size == 512
    assert config.method.temperature == 0.3
    assert config.log.dir == "/tmp/x"
    # The keys scripts rely on (docs/architecture.md, "Public surface") exist under these names.
    for key in ("seed", "data.train", "data.val", "data.samples_per_epoch", "optim.batch_size", "optim.epochs",
                "optim.max_steps", "engine.kind", "engine.precision", "log.dir"):
        config_lib.get(config, key)


def test_linear_and_sqrt_lr_scaling():
    linear = config_lib.load(QUICKSTART, ["optim.base_lr=0.3", "optim.batch_size=4096"])
    assert linear.optim.lr == pytest.approx(0.3 * 4096 / 256)
    sqrt = config_lib.load(QUICKSTART, ["optim.base_lr=0.075", "optim.batch_size=4096", "optim.lr_scaling=sqrt"])
    assert sqrt.optim.lr == pytest.approx(0.075 * math.sqrt(4096))
    fixed = config_lib.load(QUICKSTART, ["optim.lr=0.01"])
    assert fixed.optim.lr == 0.01


def test_default_log_dir_is_named_after_the_recipe():
    assert config_lib.load(QUICKSTART).log.dir == str(Path("runs") / "simclr")


def test_global_batch_must_split_over_ranks():
    config = config_lib.load(QUICKSTART, ["optim.batch_size=256"])
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
        config_lib.load(QUICKSTART, [override])


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
        config_lib.load(recipe)


def test_print_config_prints_resolved_yaml_that_loads_back(tmp_path: Path):
    result = run_cli("train", str(QUICKSTART), "optim.batch_size=512", "--print-config", timeout=120)
    assert result.returncode == 0, result.stderr
    printed = tmp_path / "printed.yaml"
    printed.write_text(result.stdout)
    assert config_lib.load(printed) == config_lib.load(QUICKSTART, ["optim.batch_size=512"])
    values = yaml.safe_load(result.stdout)
    assert values["optim"]["lr"] == pytest.approx(values["optim"]["base_lr"] * 512 / 256)


def test_recipes_are_read_and_checked_without_importing_torch():
    """--print-config and config errors answer before torch and timm load (seconds on a cold disk)."""
    import subprocess
    import sys

    probe = ("import sys; from bigssl.cli import main; code = main(sys.argv[1:]); "
             "heavy = sorted(m for m in ('torch', 'timm', 'webdataset', 'deepspeed') if m in sys.modules); "
             "print('HEAVY', heavy, 'CODE', code)")
    recipes = sorted((QUICKSTART.parent.parent).glob("*/*.yaml"))
    assert len(recipes) >= 15
    for args in ([str(QUICKSTART), "--print-config"], [str(recipes[-1]), "--print-config"],
                 [str(QUICKSTART), "method.nope=1"], [str(QUICKSTART), "method.name=nope"]):
        result = subprocess.run([sys.executable, "-c", probe, "train", *args], capture_output=True, text=True,
                                timeout=120)
        assert "HEAVY [] CODE" in result.stdout, (args, result.stdout[-300:], result.stderr[-300:])
        assert ("CODE 0" in result.stdout) == ("--print-config" in args)
