"""A full disk outside checkpoint writes (issue 18, item 5): exporting the backbone, writing
config.yaml at start, and logging (metrics.jsonl, TensorBoard's writer thread). Each ends with
exit 2 and one line naming the file, what was there before is intact, and no partly written
file is left in its place. The disk is a real small tmpfs, filled up (helpers.tmpfs / fill),
as tests/test_checkpoint_integrity.py does for checkpoints."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import SMALL_RUN
from datasets import make_shards, pattern
from helpers import QUICKSTART, SMALL, fill, tmpfs
from safetensors.torch import load_file
from torch import nn

from bigssl import cli
from bigssl.config import MethodConfig
from bigssl.errors import UserError
from bigssl.methods.base import Method, StepOutput, register
from bigssl.monitor import Monitor

NO_SPACE = "No space left on device; 0.0 MiB free there)"


def last_error_line(err: str) -> str:
    assert "Traceback" not in err and "Exception in thread" not in err, err
    return err.strip().splitlines()[-1]


def contents(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def disk(tmp_path: Path):
    with tmpfs(tmp_path / "disk", "2m") as mount:
        yield mount


@pytest.mark.parametrize("out", ["backbone.safetensors", "backbone"])  # one file; timm's hub folder
def test_export_to_a_full_disk_keeps_the_previous_export(small_run, disk: Path, capsys: pytest.CaptureFixture,
                                                         out: str):
    target = disk / out
    assert cli.main(["export", str(small_run("ddp")), str(target)]) == 0
    before = contents(disk)
    filler = fill(disk)
    assert cli.main(["export", str(small_run("ddp")), str(target)]) == 2
    line = last_error_line(capsys.readouterr().err)
    written = target if out.endswith(".safetensors") else target / "model.safetensors"
    assert line == f"bigssl: error: could not write {written} ({NO_SPACE}"
    filler.unlink()
    assert contents(disk) == before  # the previous export, whole; no .tmp left beside it
    assert load_file(written)


def test_a_full_disk_at_start_leaves_no_config_yaml(disk: Path, capsys: pytest.CaptureFixture):
    run = disk / "run"
    fill(disk)
    code = cli.main(["train", str(QUICKSTART), *SMALL, *SMALL_RUN, f"log.dir={run}"])
    line = last_error_line(capsys.readouterr().err)
    assert code == 2 and line == f"bigssl: error: could not write {run / 'config.yaml'} ({NO_SPACE}"
    assert not run.exists() or sorted(p.name for p in run.iterdir()) == []  # no 0-byte config.yaml, no .tmp


def test_metrics_on_a_full_disk_keep_the_records_before(disk: Path):
    monitor = Monitor(disk / "run", is_main=True, start_step=0, tensorboard=False, progress=False)
    monitor.log(1, {"loss": 1.0, "note": "x" * 3000})
    before = (disk / "run" / "metrics.jsonl").read_bytes()
    fill(disk)  # tmpfs hands out 4 KiB pages: the second record does not fit in the first's
    with pytest.raises(UserError) as raised:
        monitor.log(2, {"loss": 2.0, "note": "y" * 3000})
    monitor.close(failing=True)
    assert str(raised.value) == f"could not write {disk / 'run' / 'metrics.jsonl'} ({NO_SPACE}"
    assert (disk / "run" / "metrics.jsonl").read_bytes() == before  # no half record after it


def test_tensorboard_on_a_full_disk_is_one_line_and_no_thread_traceback(tmp_path: Path, capfd: pytest.CaptureFixture):
    """TensorBoard writes from its own thread: the failure is reported once, by the run, naming
    the directory; the thread dies without printing its traceback."""
    run = tmp_path / "run"
    with tmpfs(run / "tb", "64k") as tb:
        monitor = Monitor(run, is_main=True, start_step=0, tensorboard=True, progress=False)
        monitor.log(1, {"loss": 1.0})
        fill(tb)
        errors = []
        many = {f"value_{i}": float(i) for i in range(100)}  # ~6 KB of events a step: more than a page
        for call in (lambda: [monitor.log(step, many) for step in range(2, 20)], monitor.close):
            try:
                call()
            except UserError as err:
                errors.append(str(err))
        assert errors and all(e == f"could not write {tb} ({NO_SPACE}" for e in errors), errors
        assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()][:2] == [1, 2]
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception in thread" not in err, err


# ------------------------------------------------------------------- a run whose disk fills up
@dataclass
class FillsDiskConfig(MethodConfig):
    name: str = "test_fills_disk"
    disk: str = ""
    at_step: int = 3


@register("test_fills_disk")
class FillsDisk(Method):
    """A linear map; fills `disk` at the start of step `at_step`, as another job might."""

    config_class = FillsDiskConfig
    config: FillsDiskConfig

    def build(self) -> None:
        self.backbone = nn.Linear(3, 2)

    def training_step(self, batch, step):
        if step == self.config.at_step:
            fill(Path(self.config.disk))
        return StepOutput(self.backbone(batch["views"][0].mean(dim=(0, 3, 4))).pow(2).mean())


def test_a_disk_that_fills_while_logging_ends_the_run_with_one_line(disk: Path, tmp_path: Path,
                                                                   capfd: pytest.CaptureFixture):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method:\n  name: test_fills_disk\n")
    shards = make_shards(tmp_path / "ds", 128, 16)
    run = disk / "run"
    code = cli.main(["train", str(recipe), f"data.train={pattern(shards, 8)}", "data.val=", "data.workers=0",
                     "data.views.size=8", "optim.batch_size=8", "optim.epochs=1", "model.channels_last=false",
                     f"log.dir={run}", "log.every_steps=1", "log.tensorboard=true", "log.progress=false",
                     "checkpoint.every_steps=0", f"method.disk={disk}", "method.at_step=3"])
    line = last_error_line(capfd.readouterr().err)  # and no TensorBoard thread traceback
    # metrics.jsonl or TensorBoard's events, whichever needs a new page of the full disk first
    assert code == 2 and line in (f"bigssl: error: could not write {run / 'metrics.jsonl'} ({NO_SPACE}",
                                  f"bigssl: error: could not write {run / 'tb'} ({NO_SPACE}"), line
    text = (run / "metrics.jsonl").read_text()
    steps = [json.loads(record)["step"] for record in text.splitlines()]
    assert text.endswith("\n") and steps == list(range(1, len(steps) + 1)) and 3 <= len(steps) < 16
    assert yaml.safe_load((run / "config.yaml").read_text())["method"]["name"] == "test_fills_disk"
