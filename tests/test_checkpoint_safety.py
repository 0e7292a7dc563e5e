"""No checkpoint runs code (issue 18, items 1-2): a pickle payload planted in any engine's
checkpoint (DDP state.pt, DeepSpeed's zero/ files, FSDP's dcp/.metadata), with the manifest
rewritten to match as an attacker who can write the directory would, is refused by every
command that reads checkpoints: export, eval knn/linear/zeroshot (exit 2, one line naming the
file) and train resume (set aside, the previous checkpoint resumed). The payload creates a
marker file when unpickled; it is shown to work under plain unpickling first, then never to run.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SMALL_RUN, SMALL_RUN_ENGINES
from engine_cases import setup
from helpers import QUICKSTART, SMALL, run_cli, worker_env

from bigssl import cli, recipes
from bigssl.checkpoint import MANIFEST, Checkpointer
from bigssl.distributed.engines import dcp_safe
from bigssl.errors import CheckpointError

ENGINES = ["ddp", "fsdp", "deepspeed"]
PLANTED_IN = {"ddp": "state.pt", "fsdp": "dcp/.metadata", "deepspeed": "zero/mp_rank_00_model_states.pt"}
EVAL_DATA = ["--val", "quickstart:val", "--workers", "0"]
COMMANDS = {"export": lambda run, out: ["export", str(run), str(out)],
            "knn": lambda run, out: ["eval", "knn", str(run), "--train", "quickstart:train", *EVAL_DATA],
            "linear": lambda run, out: ["eval", "linear", str(run), "--train", "quickstart:train", *EVAL_DATA],
            "zeroshot": lambda run, out: ["eval", "zeroshot", str(run), *EVAL_DATA]}
NEWEST = "checkpoints/step_00000002"


class Planted:
    """Unpickled by a plain unpickler, this creates `marker`: what a crafted checkpoint can do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant(file: Path, marker: Path) -> None:
    """Add the payload to `file`, keeping the rest of its content (bigssl's own file: trusted here)."""
    if file.name == dcp_safe.METADATA:
        metadata = pickle.loads(file.read_bytes())
        metadata.planner_data["planted"] = Planted(marker)
        file.write_bytes(pickle.dumps(metadata))
    else:
        content = torch.load(file, weights_only=False)
        content["planted"] = Planted(marker)
        torch.save(content, file)


def unpickle_plainly(file: Path) -> None:
    """What torch's FileSystemReader and DeepSpeed's zero_to_fp32 do with these files."""
    if file.name == dcp_safe.METADATA:
        pickle.loads(file.read_bytes())
    else:
        torch.load(file, weights_only=False)


def reseal(checkpoint: Path) -> None:
    """Rewrite manifest.json to match the files, as anyone who can write the directory can."""
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    for entry in manifest["files"]:
        data = (checkpoint / entry["path"]).read_bytes()
        entry.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture
def crafted(small_run, tmp_path: Path, request: pytest.FixtureRequest):
    """`crafted(engine)`: a copy of that engine's small run whose newest checkpoint carries the
    payload, resealed; returns (run, file, marker). The marker is absent."""

    def make(engine: str) -> tuple[Path, Path, Path]:
        run = tmp_path / f"run-{engine}"
        shutil.copytree(small_run(engine), run)
        file, marker = run / NEWEST / PLANTED_IN[engine], tmp_path / "code-ran"
        plant(file, marker)
        reseal(run / NEWEST)
        return run, file, marker

    return make


@pytest.mark.parametrize("engine", ENGINES)
def test_the_planted_payload_runs_under_plain_unpickling(crafted, engine: str):
    """The premise: this payload is live, so its absence below is bigssl's doing."""
    _, file, marker = crafted(engine)
    unpickle_plainly(file)
    assert marker.exists()


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("engine", ENGINES)
def test_export_and_eval_refuse_a_crafted_checkpoint(crafted, capsys: pytest.CaptureFixture, tmp_path: Path,
                                                     engine: str, command: str):
    run, file, marker = crafted(engine)
    code = cli.main(COMMANDS[command](run, tmp_path / "out.safetensors"))
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and not marker.exists()
    assert line.startswith(f"bigssl: error: checkpoint not loaded: {file}: refused: it holds more than ")
    assert line.endswith(f"an older checkpoint of the run may be given instead: {run / 'checkpoints/step_00000001'}")
    assert not (tmp_path / "out.safetensors").exists()


def test_in_a_real_process_the_refusal_is_one_line_and_debug_shows_the_traceback(crafted, tmp_path: Path):
    """DeepSpeed's files are checked without importing DeepSpeed (which would print its own
    lines); BIGSSL_DEBUG=1 gives the traceback, and still runs nothing."""
    run, file, marker = crafted("deepspeed")
    result = run_cli("export", str(run), str(tmp_path / "out.safetensors"))
    assert result.returncode == 2 and not marker.exists()
    assert str(file) in one_error_line(result.stderr)
    debug = run_cli("export", str(run), str(tmp_path / "out.safetensors"), env={**worker_env(), "BIGSSL_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "CheckpointError" in debug.stderr
    assert not marker.exists()


@pytest.mark.parametrize("engine", ENGINES)
def test_train_resume_sets_a_crafted_checkpoint_aside_and_resumes_the_previous_one(crafted, engine: str):
    run, file, marker = crafted(engine)
    result = run_cli("train", str(QUICKSTART), *SMALL, *SMALL_RUN, *SMALL_RUN_ENGINES[engine], f"log.dir={run}",
                     "optim.max_steps=3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not marker.exists() and "Traceback" not in result.stderr
    relative = file.relative_to(run / NEWEST)
    warning = next(line for line in result.stderr.splitlines() if "is corrupt" in line)
    assert warning.startswith(f"bigssl: warning: checkpoint {run / NEWEST} is corrupt ({relative}: refused: ")
    assert warning.endswith("renamed to step_00000002.corrupt; falling back to step_00000001")
    assert f"resumed from {run / 'checkpoints/step_00000001'} (step 1)" in result.stderr
    names = {p.name for p in (run / "checkpoints").iterdir()}
    assert {"step_00000002.corrupt", "step_00000003"} <= names  # set aside, not deleted; training went on


# ------------------------------------------------------------------- DCP metadata, unit by unit
@pytest.fixture
def fsdp_checkpoint(small_run, tmp_path: Path) -> Path:
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(small_run("fsdp") / NEWEST, checkpoint)
    return checkpoint


def test_dcp_metadata_of_a_real_checkpoint_parses_and_merges(fsdp_checkpoint: Path):
    metadata = dcp_safe.read_metadata(fsdp_checkpoint / "dcp")
    state = dcp_safe.read_model_state(fsdp_checkpoint / "dcp")
    shapes = {k.removeprefix("model."): tuple(v.size) for k, v in metadata.state_dict_metadata.items()
              if k.startswith("model.")}
    assert {k: tuple(v.shape) for k, v in state.items()} == shapes and len(shapes) > 10


@pytest.mark.parametrize(("entry", "value", "reason"), [
    ("relative_path", "../../outside.distcp", "points outside the directory"),
    ("offset", 10**12, "an entry lies outside the file"),
    ("transform_descriptors", ["zstd"], "stream transforms"),
])
def test_dcp_metadata_pointing_elsewhere_is_refused(fsdp_checkpoint: Path, entry: str, value, reason: str):
    path = fsdp_checkpoint / "dcp" / dcp_safe.METADATA
    metadata = pickle.loads(path.read_bytes())
    setattr(next(iter(metadata.storage_data.values())), entry, value)
    path.write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=reason) as raised:
        dcp_safe.read_metadata(fsdp_checkpoint / "dcp")
    assert str(raised.value).startswith(f"{path}: ")


def test_a_payload_in_a_dcp_entry_is_refused(fsdp_checkpoint: Path, tmp_path: Path):
    """Non-tensor entries (optimizer hyper-parameters) live in the .distcp data file, where torch's
    planner would read them with weights_only=False: here they are read weights-only."""
    dcp_dir = fsdp_checkpoint / "dcp"
    metadata = dcp_safe.read_metadata(dcp_dir)
    index, info = next((i, s) for i, s in metadata.storage_data.items()
                       if isinstance(metadata.state_dict_metadata[i.fqn], dcp_safe.BytesStorageMetadata))
    data_file = dcp_dir / info.relative_path
    marker = tmp_path / "code-ran"
    payload = io.BytesIO()
    torch.save(Planted(marker), payload)
    data = data_file.read_bytes()
    data_file.write_bytes(data + payload.getvalue())  # appended; the entry points at it
    info.offset, info.length = len(data), len(payload.getvalue())
    (dcp_dir / dcp_safe.METADATA).write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=rf"entry {index.fqn}: refused") as raised:
        dcp_safe.inspect(dcp_dir)
    assert str(raised.value).startswith(str(data_file))
    with pytest.raises(CheckpointError, match=rf"{data_file}: entry {index.fqn}: refused"):
        dcp_safe.load({index.fqn: None}, dcp_dir, alone=True)  # what a resume reads
    assert not marker.exists()


def test_a_damaged_fsdp_checkpoint_is_one_line_not_a_checkpoint_exception(small_run, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture):
    """Zeroed bytes in a tensor's record, manifest resealed: every parse check passes and DCP
    fails while reading; its CheckpointException (a BaseException) must not escape."""
    run = tmp_path / "run"
    shutil.copytree(small_run("fsdp"), run)
    dcp_dir = run / NEWEST / "dcp"
    metadata = dcp_safe.read_metadata(dcp_dir)
    info = next(s for i, s in metadata.storage_data.items()
                if isinstance(metadata.state_dict_metadata[i.fqn], dcp_safe.TensorStorageMetadata))
    data_file = dcp_dir / info.relative_path
    data = bytearray(data_file.read_bytes())
    data[info.offset: info.offset + 64] = bytes(64)
    data_file.write_bytes(bytes(data))
    reseal(run / NEWEST)
    code = cli.main(["export", str(run), str(tmp_path / "out.safetensors")])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and line.startswith(f"bigssl: error: {data_file}: unreadable (")
    # At resume it is set aside like any corrupt checkpoint, and the previous one is loaded.
    engine = setup(recipes.load(run / "config.yaml", []), rank=0, world_size=1)  # a private 1-rank group
    try:
        warnings: list[str] = []
        path, extra = Checkpointer(run, keep=2, is_main=True).resume(warnings.append, engine.load)
    finally:
        torch.distributed.destroy_process_group()  # left to no other test
    assert path.name == "step_00000001" and extra["step"] == 1
    assert len(warnings) == 1 and f"(dcp/{data_file.name}: unreadable (" in warnings[0]
