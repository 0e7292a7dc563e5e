import pytest
import torch
from torch import nn

from bigssl.config import Config
from bigssl.distributed.engines import build_engine
from bigssl.distributed.env import DistEnv
from bigssl.errors import ConfigError
from bigssl.methods.base import Method, StepOutput
from bigssl.methods.context import RunContext, ViewLayout


class Regression(Method):
    def build(self) -> None:
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch, step):
        return StepOutput(((self.backbone(batch["x"]) - batch["y"]) ** 2).mean())


def regression(config: Config) -> Regression:
    return Regression(config.method, config.model, ViewLayout(), RunContext.of(config))


def engine_for(**engine_keys) -> tuple:
    config = Config()
    for key, value in engine_keys.items():
        section, name = key.split("__")
        setattr(getattr(config, section), name, value)
    engine = build_engine(config, DistEnv(), torch.device("cpu"))
    engine.setup(regression(config), lambda m: torch.optim.SGD(m.parameters(), lr=0.0))
    batch = {"x": torch.randn(32, 8, generator=torch.Generator().manual_seed(1)) * 10, "y": torch.ones(32, 1) * 50}
    return engine, batch


def test_gradient_clipping_caps_the_global_norm():
    engine, batch = engine_for(optim__clip_grad=0.5)
    engine.backward(engine.forward(batch, 0).loss)
    before = torch.sqrt(sum((p.grad ** 2).sum() for p in engine.method.parameters())).item()
    original_step = engine.optimizer.step
    seen = {}

    def spy():  # the norm the optimizer actually receives
        seen["norm"] = torch.sqrt(sum((p.grad ** 2).sum() for p in engine.method.parameters())).item()
        original_step()

    engine.optimizer.step = spy
    reported = engine.step()
    assert reported == pytest.approx(before, rel=1e-5) and before > 0.5
    assert seen["norm"] == pytest.approx(0.5, rel=1e-4)
    assert all(p.grad is None for p in engine.method.parameters())


def test_per_parameter_clipping_caps_each_gradient_alone():
    """DINO's clipping: every parameter's gradient scaled to norm ≤ 0.5 on its own, the small
    ones left as they were; the reported norm is still the global pre-clip norm."""
    engine, batch = engine_for(optim__clip_grad=0.5, optim__clip_grad_per_parameter=True)
    engine.backward(engine.forward(batch, 0).loss)
    grads = {name: p.grad.clone() for name, p in engine.method.named_parameters()}
    expected = {name: g * min(1.0, 0.5 / (g.norm().item() + 1e-6)) for name, g in grads.items()}
    assert sum(g.norm() > 0.5 for g in grads.values()) >= 2  # clipping acts on several
    original_step, seen = engine.optimizer.step, {}

    def spy():
        seen.update({name: p.grad.clone() for name, p in engine.method.named_parameters()})
        original_step()

    engine.optimizer.step = spy
    reported = engine.step()
    assert reported == pytest.approx(torch.stack([g.norm() for g in grads.values()]).norm().item(), rel=1e-5)
    for name, gradient in expected.items():
        torch.testing.assert_close(seen[name], gradient, rtol=1e-6, atol=0)


def test_bf16_autocast_runs_the_forward_in_bf16():
    engine, batch = engine_for(engine__precision="bf16")
    with engine.autocast():
        assert engine.method.backbone(batch["x"]).dtype == torch.bfloat16
    fp32_engine, _ = engine_for()
    loss_bf16 = engine.forward(batch, 0).loss.float()
    loss_fp32 = fp32_engine.forward(batch, 0).loss
    assert torch.isfinite(loss_bf16) and loss_bf16.item() == pytest.approx(loss_fp32.item(), rel=0.05)
    engine.backward(loss_bf16)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in engine.method.parameters())


def test_fp16_needs_a_gpu():
    with pytest.raises(ConfigError, match="engine.precision"):
        engine_for(engine__precision="fp16")


@pytest.mark.parametrize("kind", ["ddp", "fsdp", "zero1", "zero2", "zero3"])
def test_ema_update_is_m_teacher_plus_one_minus_m_student_on_every_engine(kind: str):
    """One process, each engine's own local tensors (ZeRO-3's ds_tensor, FSDP2's shards):
    teacher ← m·teacher + (1 − m)·student, written out on whole tensors."""
    from engine_cases import full, make_config, setup

    keys = {"ddp": ["engine.kind=ddp"], "fsdp": ["engine.kind=fsdp"],
            **{f"zero{s}": ["engine.kind=deepspeed", f"engine.zero_stage={s}"] for s in (1, 2, 3)}}[kind]
    engine = setup(make_config("test_tiny_ema", *keys), 0, 1)
    pairs = engine.method.ema_pairs()
    with torch.no_grad():  # a teacher apart from its student, so m and 1 − m cannot be confused
        for _, teacher in pairs:
            for param in teacher.parameters():
                engine.local_tensor(param).mul_(-3.0).add_(1.0)
    students = [full(p) for s, _ in pairs for p in s.parameters()]
    teachers = [full(p) for _, t in pairs for p in t.parameters()]
    engine.ema_update(pairs, 0.9)
    after = [full(p) for _, t in pairs for p in t.parameters()]
    for got, teacher, student in zip(after, teachers, students, strict=True):
        torch.testing.assert_close(got, 0.9 * teacher + 0.1 * student, rtol=1e-6, atol=1e-7)


def test_deepspeed_is_started_without_compiling_its_muon_optimizer():
    """Every ZeRO setup imports DeepSpeed's Muon optimizer, whose module wraps its kernels in
    torch.compile at import (all of TorchInductor: 2 s of CPU a rank). The engine imports it
    first with TorchDynamo off: its functions stay plain, and torch.compile compiles again after."""
    from bigssl.distributed.engines import deepspeed_zero

    deepspeed_zero._deepspeed()
    from deepspeed.runtime.zero.muon import muon_optimizer, original_muon

    assert muon_optimizer.MuonWithAuxAdam  # the module is whole
    assert not hasattr(original_muon.muon_update, "_torchdynamo_orig_callable")  # not wrapped for compiling

    def double(x):
        return 2 * x

    assert torch.compile(double, backend="eager") is not double  # TorchDynamo is on again
