"""Checkpoint faults: checksums written at save and checked at resume (a corrupt checkpoint is set
aside and the previous one resumed), a full disk or a write error on any rank (every rank
stops with one clear error, the previous checkpoint kept), and non-finite weights (never written)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import run_distributed, tmpfs
from torch import nn

from bigssl import checkpoint as checkpoint_lib
from bigssl.checkpoint import MANIFEST, Checkpointer
from bigssl.config import Config, MethodConfig
from bigssl.distributed import comm
from bigssl.distributed.engines import build_engine
from bigssl.distributed.env import DistEnv
from bigssl.errors import CheckpointError, UserError
from bigssl.methods.base import Method, StepOutput
from bigssl.methods.context import RunContext, ViewLayout


class FakeEngine:
    """What Checkpointer uses of an engine: `method`, `local_tensor` and `save`, which writes
    `files` (name → bytes) or raises `fail`."""

    def __init__(self, files: dict[str, bytes], method: nn.Module | None = None,
                 fail: BaseException | None = None) -> None:
        self.files = files
        self.method = method if method is not None else nn.BatchNorm1d(3)
        self.fail = fail
        self.saves = 0

    def local_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach()

    def save(self, directory: Path, extra: dict) -> None:
        self.saves += 1
        for name, data in self.files.items():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            (directory / name).write_bytes(data)
        if self.fail is not None:
            raise self.fail


def payload(seed: int, size: int = 5000) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (size,), generator=generator, dtype=torch.uint8).numpy().tobytes()


FILES = {"state.bin": payload(1), "shards/rank0.bin": payload(2, 777), "shards/rank1.bin": payload(3, 0)}


def recomputed_manifest(directory: Path) -> list[dict]:
    """The manifest as this test computes it, independently of bigssl."""
    names = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    return [{"path": n, "size": (directory / n).stat().st_size,
             "sha256": hashlib.sha256((directory / n).read_bytes()).hexdigest()} for n in names if n != MANIFEST]


def two_checkpoints(tmp_path: Path, keep: int = 3) -> Checkpointer:
    checkpointer = Checkpointer(tmp_path / "run", keep=keep, is_main=True)
    checkpointer.save(100, FakeEngine(FILES), {})
    checkpointer.save(200, FakeEngine({**FILES, "state.bin": payload(4)}), {})
    return checkpointer


def test_manifest_lists_every_file_with_its_size_and_sha256(tmp_path: Path):
    checkpointer = two_checkpoints(tmp_path)
    for path in checkpointer.published():
        manifest = json.loads((path / MANIFEST).read_text())
        assert manifest["files"] == recomputed_manifest(path)
        assert [e["path"] for e in manifest["files"]] == sorted(FILES)
    assert sorted(p.name for p in checkpointer.root.iterdir()) == ["step_00000100", "step_00000200"]


def damage(file: Path, how: str) -> None:
    data = bytearray(file.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x01  # same size: only the hash can tell
        file.write_bytes(bytes(data))
    elif how == "truncate":
        file.write_bytes(bytes(data[:-10]))
    else:
        file.unlink()


@pytest.mark.parametrize(("how", "reason"), [("flip", "sha256 mismatch"), ("truncate", "size mismatch"),
                                              ("delete", "missing")])
def test_corrupt_newest_falls_back_and_is_set_aside(tmp_path: Path, how: str, reason: str):
    checkpointer = two_checkpoints(tmp_path)
    newest = checkpointer.root / "step_00000200"
    damage(newest / "shards" / "rank0.bin", how)
    warnings: list[str] = []
    assert checkpointer.resumable(warnings.append) == checkpointer.root / "step_00000100"
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith(f"bigssl: warning: checkpoint {newest} is corrupt (shards/rank0.bin: {reason}")
    assert "step_00000200.corrupt" in warnings[0] and warnings[0].endswith("falling back to step_00000100")
    # Set aside, not deleted, and no longer published: neither resumed nor counted by retention.
    assert not newest.exists() and (checkpointer.root / "step_00000200.corrupt" / "state.bin").is_file()
    assert checkpointer.latest() == checkpointer.root / "step_00000100"
    assert checkpointer.resumable(warnings.append) == checkpointer.root / "step_00000100" and len(warnings) == 1
    checkpointer.keep = 1
    checkpointer.save(300, FakeEngine(FILES), {})
    assert sorted(p.name for p in checkpointer.root.iterdir()) == ["step_00000200.corrupt", "step_00000300"]


def test_a_second_corruption_at_the_same_step_gets_its_own_name(tmp_path: Path):
    checkpointer = two_checkpoints(tmp_path)
    for _ in range(2):
        damage(checkpointer.root / "step_00000200" / "state.bin", "flip")
        checkpointer.resumable(lambda line: None)
        checkpointer.save(200, FakeEngine(FILES), {})
    assert sorted(p.name for p in checkpointer.set_aside()) == ["step_00000200.corrupt", "step_00000200.corrupt-2"]


def test_every_checkpoint_corrupt_is_an_error_not_a_fresh_start(tmp_path: Path):
    checkpointer = two_checkpoints(tmp_path)
    damage(checkpointer.root / "step_00000100" / "state.bin", "flip")
    damage(checkpointer.root / "step_00000200" / "state.bin", "truncate")
    warnings: list[str] = []
    with pytest.raises(UserError) as raised:
        checkpointer.resumable(warnings.append)
    message = str(raised.value)
    assert "\n" not in message
    assert "step_00000200 (state.bin: size mismatch" in message
    assert "step_00000100 (state.bin: sha256 mismatch)" in message
    assert len(warnings) == 2 and warnings[1].endswith("no older checkpoint to fall back to")
    with pytest.raises(UserError, match="holds only corrupt checkpoints"):  # nor on the next attempt
        checkpointer.resumable(warnings.append)


def test_a_checkpoint_without_manifest_is_set_aside_not_resumed_unverified(tmp_path: Path):
    """Issue 18, item 3: flipped bytes in a checkpoint without manifest.json loaded silently."""
    checkpointer = two_checkpoints(tmp_path)
    newest = checkpointer.root / "step_00000200"
    (newest / MANIFEST).unlink()
    damage(newest / "state.bin", "flip")  # nothing to check it against: it must not be used
    warnings: list[str] = []
    assert checkpointer.resumable(warnings.append) == checkpointer.root / "step_00000100"
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith(f"bigssl: warning: checkpoint {newest} is corrupt ({MANIFEST}: missing")
    assert warnings[0].endswith("renamed to step_00000200.corrupt; falling back to step_00000100")


def test_a_file_the_manifest_does_not_list_is_corrupt(tmp_path: Path):
    checkpointer = two_checkpoints(tmp_path)
    (checkpointer.root / "step_00000200" / "planted.pt").write_bytes(b"")
    warnings: list[str] = []
    assert checkpointer.resumable(warnings.append) == checkpointer.root / "step_00000100"
    assert "(planted.pt: not in the manifest)" in warnings[0]


def test_unreadable_manifest_is_corrupt(tmp_path: Path):
    checkpointer = two_checkpoints(tmp_path)
    (checkpointer.root / "step_00000200" / MANIFEST).write_text('{"files": [')
    warnings: list[str] = []
    assert checkpointer.resumable(warnings.append) == checkpointer.root / "step_00000100"
    assert f"({MANIFEST}: unreadable" in warnings[0]


def test_a_run_without_checkpoints_resumes_nothing(tmp_path: Path):
    assert Checkpointer(tmp_path / "run", keep=1, is_main=True).resumable(pytest.fail) is None


def assert_only_first_kept(checkpointer: Checkpointer) -> None:
    assert [p.name for p in checkpointer.root.iterdir()] == ["step_00000100"]  # no .partial, no step_200
    assert checkpointer.verify(checkpointer.root / "step_00000100") is None


def test_write_error_keeps_the_previous_checkpoint(tmp_path: Path):
    checkpointer = Checkpointer(tmp_path / "run", keep=1, is_main=True)
    checkpointer.save(100, FakeEngine(FILES), {})
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "state.bin")
    with pytest.raises(UserError) as raised:
        checkpointer.save(200, FakeEngine(FILES, fail=full), {})
    message = str(raised.value)
    assert message.startswith(f"could not write checkpoint {checkpointer.root / 'step_00000200'} ([Errno 28] No space")
    assert "MiB free there" in message and message.endswith("the last good checkpoint step_00000100 is kept")
    assert_only_first_kept(checkpointer)


def test_hashing_error_is_a_write_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    checkpointer = Checkpointer(tmp_path / "run", keep=1, is_main=True)
    checkpointer.save(100, FakeEngine(FILES), {})

    def failing(directory: Path, name: str) -> dict:
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(directory / name))

    monkeypatch.setattr(checkpoint_lib, "_entry", failing)
    with pytest.raises(UserError, match=r"Input/output error"):
        checkpointer.save(200, FakeEngine(FILES), {})
    assert_only_first_kept(checkpointer)


def test_a_bug_in_engine_save_keeps_its_traceback(tmp_path: Path):
    """Not a disk fault: the original exception, not a one-line UserError; still cleaned up."""
    checkpointer = Checkpointer(tmp_path / "run", keep=1, is_main=True)
    checkpointer.save(100, FakeEngine(FILES), {})
    with pytest.raises(KeyError, match="optimizer"):
        checkpointer.save(200, FakeEngine(FILES, fail=KeyError("optimizer")), {})
    assert_only_first_kept(checkpointer)


@pytest.mark.parametrize(("where", "value"), [("weight", float("inf")), ("weight", float("nan")),
                                               ("running_mean", float("nan"))])
def test_non_finite_weights_are_never_written(tmp_path: Path, where: str, value: float):
    checkpointer = Checkpointer(tmp_path / "run", keep=1, is_main=True)
    checkpointer.save(100, FakeEngine(FILES), {})
    method = nn.BatchNorm1d(3)
    with torch.no_grad():
        getattr(method, where)[1] = value
    engine = FakeEngine(FILES, method=method)
    with pytest.raises(UserError) as raised:
        checkpointer.save(200, engine, {})
    kind = "parameter" if where == "weight" else "buffer"
    assert f"{kind} {where} is not finite" in str(raised.value)
    assert str(raised.value).endswith("the last good checkpoint step_00000100 is kept")
    assert engine.saves == 0
    assert_only_first_kept(checkpointer)


def test_an_infinite_buffer_is_written(tmp_path: Path):
    """Buffers may hold -inf on purpose (a causal attention mask); only NaN marks them broken."""
    method = nn.BatchNorm1d(3)
    method.register_buffer("mask", torch.full((2, 2), float("-inf")).triu(1))
    checkpointer = Checkpointer(tmp_path / "run", keep=1, is_main=True)
    engine = FakeEngine(FILES, method=method)
    checkpointer.save(100, engine, {})
    assert engine.saves == 1 and checkpointer.latest().name == "step_00000100"


# ------------------------------------------------------------------------ the real DDP engine
@dataclass
class WideConfig(MethodConfig):
    width: int = 16


class Wide(Method):
    config: WideConfig

    def build(self) -> None:
        torch.manual_seed(0)
        self.backbone = nn.Linear(self.config.width, 64)

    def training_step(self, batch, step):  # pragma: no cover - never trained here
        return StepOutput(self.backbone(batch["x"]).sum())


def ddp_engine(width: int):
    config = Config()
    engine = build_engine(config, DistEnv(), torch.device("cpu"))
    method = Wide(WideConfig(width=width), config.model, ViewLayout(), RunContext.of(config))
    engine.setup(method, lambda m: torch.optim.SGD(m.parameters(), lr=0.0))
    return engine


def test_ddp_checkpoint_verifies_falls_back_and_loads(tmp_path: Path):
    engine = ddp_engine(16)
    checkpointer = Checkpointer(tmp_path / "run", keep=2, is_main=True)
    checkpointer.save(1, engine, {"step": 1})
    checkpointer.save(2, engine, {"step": 2})
    assert json.loads((checkpointer.root / "step_00000002" / MANIFEST).read_text())["files"] == \
        recomputed_manifest(checkpointer.root / "step_00000002")
    damage(checkpointer.root / "step_00000002" / "state.pt", "flip")
    warnings: list[str] = []
    path = checkpointer.resumable(warnings.append)
    assert path == checkpointer.root / "step_00000001" and "(state.pt: sha256 mismatch)" in warnings[0]
    assert engine.load(path) == {"step": 1}


def reseal(directory: Path) -> None:
    """A manifest that matches the files again, as anyone who can write the directory can make."""
    (directory / MANIFEST).write_text(json.dumps({"format": 1, "files": recomputed_manifest(directory)}))


def two_ddp_checkpoints(tmp_path: Path):
    engine = ddp_engine(16)
    checkpointer = Checkpointer(tmp_path / "run", keep=2, is_main=True)
    checkpointer.save(1, engine, {"step": 1})
    checkpointer.save(2, engine, {"step": 2})
    return engine, checkpointer, checkpointer.root / "step_00000002"


def test_a_truncated_state_without_manifest_falls_back_to_the_previous_checkpoint(tmp_path: Path):
    """Issue 18, item 4: this was rc 1, `RuntimeError: PytorchStreamReader failed…`, no file
    named and no fallback."""
    engine, checkpointer, newest = two_ddp_checkpoints(tmp_path)
    (newest / MANIFEST).unlink()
    damage(newest / "state.pt", "truncate")
    warnings: list[str] = []
    path, extra = checkpointer.resume(warnings.append, engine.load)
    assert path.name == "step_00000001" and extra == {"step": 1}
    assert len(warnings) == 1 and f"{newest} is corrupt ({MANIFEST}: missing" in warnings[0]


def test_a_file_that_does_not_parse_is_corrupt_even_when_its_manifest_matches(tmp_path: Path):
    engine, checkpointer, newest = two_ddp_checkpoints(tmp_path)
    damage(newest / "state.pt", "truncate")
    reseal(newest)
    warnings: list[str] = []
    path, extra = checkpointer.resume(warnings.append, engine.load)
    assert path.name == "step_00000001" and extra == {"step": 1}
    assert "(state.pt: unreadable (not a whole torch archive: truncated" in warnings[0]


def test_a_checkpoint_error_while_loading_falls_back_and_other_errors_are_raised(tmp_path: Path):
    checkpointer = two_checkpoints(tmp_path)
    newest = checkpointer.root / "step_00000200"

    def refuse_newest(path: Path) -> str:
        if path == newest:
            raise CheckpointError(f"{path / 'state.bin'}: refused: it holds more than tensors")
        return path.name

    def bug(path: Path) -> str:
        raise KeyError("extra")

    # Not the checkpoint's fault (another model, a bug): one line naming it; nothing is set aside.
    with pytest.raises(UserError, match=rf"^could not load checkpoint {newest} \(KeyError: 'extra'\)$") as raised:
        checkpointer.resume(pytest.fail, bug)
    assert isinstance(raised.value.__cause__, KeyError) and checkpointer.set_aside() == []
    warnings: list[str] = []
    assert checkpointer.resume(warnings.append, refuse_newest) == (checkpointer.root / "step_00000100",
                                                                 "step_00000100")
    assert len(warnings) == 1 and "is corrupt (state.bin: refused: it holds more than tensors)" in warnings[0]


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 400 KiB tmpfs: room for one checkpoint of a 64×1024 float32 layer (≈ 260 KiB), not two."""
    with tmpfs(tmp_path / "small", "400k") as mount:
        yield mount


def test_full_disk_keeps_the_previous_checkpoint(small_disk: Path):
    engine = ddp_engine(1024)
    checkpointer = Checkpointer(small_disk / "run", keep=2, is_main=True)
    checkpointer.save(100, engine, {"step": 100})
    with pytest.raises(UserError) as raised:
        checkpointer.save(200, engine, {"step": 200})
    message = str(raised.value)
    assert "No space left on device" in message and str(checkpointer.root / "step_00000200") in message
    assert message.endswith("the last good checkpoint step_00000100 is kept")
    assert_only_first_kept(checkpointer)
    warnings: list[str] = []
    assert checkpointer.resumable(warnings.append) == checkpointer.root / "step_00000100" and warnings == []
    assert engine.load(checkpointer.root / "step_00000100") == {"step": 100}


# ------------------------------------------------------------------------------- two ranks
def rank_files(rank: int) -> dict[str, bytes]:
    """Each rank writes its own two files; the sorted list interleaves them so that each rank
    hashes one file the other rank wrote."""
    return {f"rank{rank}_a.bin": payload(10 + rank), f"rank{rank}_b.bin": payload(20 + rank, 3000)}


def _two_ranks(rank: int, world_size: int, root: str) -> None:
    assert comm.world_size() == 2 and comm.rank() == rank
    hashed: list[str] = []
    entry = checkpoint_lib._entry

    def spy(directory: Path, name: str) -> dict:
        hashed.append(name)
        return entry(directory, name)

    checkpoint_lib._entry = spy
    checkpointer = Checkpointer(Path(root) / "run", keep=3, is_main=rank == 0)
    result: dict = {}
    checkpointer.save(100, FakeEngine(rank_files(rank)), {})
    result["hashed"] = list(hashed)
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"rank{rank}_a.bin")
    try:  # only rank 1's part fails
        checkpointer.save(200, FakeEngine(rank_files(rank), fail=full if rank == 1 else None), {})
    except UserError as err:
        result["error"] = str(err)
    result["after_failure"] = sorted(p.name for p in checkpointer.root.iterdir())
    checkpointer.save(200, FakeEngine(rank_files(rank)), {})
    if rank == 0:  # rank 0 wrote it, rank 1 hashes it: rank 0 learns of the damage only from rank 1
        damage(checkpointer.root / "step_00000200" / "rank0_b.bin", "flip")
    comm.barrier()
    warnings: list[str] = []
    result["resumed"] = str(checkpointer.resumable(warnings.append))
    result["warnings"] = warnings
    checkpointer.save(300, FakeEngine(rank_files(rank)), {})

    def load(path: Path) -> str:  # refused by rank 1 alone: both ranks must fall back together
        if rank == 1 and path.name == "step_00000300":
            raise CheckpointError(f"{path / 'rank1_a.bin'}: refused")
        return path.name

    load_warnings: list[str] = []
    result["loaded"] = checkpointer.resume(load_warnings.append, load)[1]
    result["load_warnings"] = load_warnings
    (Path(root) / f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.distributed
def test_two_ranks_agree_on_write_failure_and_corruption(tmp_path: Path):
    run_distributed(_two_ranks, 2, str(tmp_path))
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    root = tmp_path / "run" / "checkpoints"
    for result in results:
        assert result["error"].startswith(f"could not write checkpoint {root / 'step_00000200'} (rank 1: [Errno 28]")
        assert result["error"].endswith("the last good checkpoint step_00000100 is kept")
        assert result["after_failure"] == ["step_00000100"]
        assert result["resumed"] == str(root / "step_00000100")
        assert len(result["warnings"]) == 1 and "(rank0_b.bin: sha256 mismatch)" in result["warnings"][0]
    assert results[0]["warnings"] == results[1]["warnings"]
    assert [r["loaded"] for r in results] == ["step_00000100"] * 2
    assert results[0]["load_warnings"] == results[1]["load_warnings"]
    assert len(results[0]["load_warnings"]) == 1 and "(rank 1: rank1_a.bin: refused)" in results[0]["load_warnings"][0]
    # Hashing was split (rank r took files[r::2]) and gives the manifest one process writes.
    assert results[0]["hashed"] == ["rank0_a.bin", "rank1_a.bin"]
    assert results[1]["hashed"] == ["rank0_b.bin", "rank1_b.bin"]
    two = json.loads((root / "step_00000100" / MANIFEST).read_text())
    single = Checkpointer(tmp_path / "single", keep=1, is_main=True)
    path = single.save(100, FakeEngine({**rank_files(0), **rank_files(1)}), {})
    assert two == json.loads((path / MANIFEST).read_text())
    assert two["files"] == recomputed_manifest(root / "step_00000100")
