import torch

from bigssl.config import ViewsConfig
from bigssl.data.views import blur_kernel, build_policy, eval_transform


def test_simclr_policy_gives_two_different_views_of_the_configured_size():
    config = ViewsConfig(size=24, crop_scale=[0.2, 1.0])
    image = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    views = build_policy(config)(image)
    assert len(views) == 2 and all(v.shape == (3, 24, 24) and v.dtype == torch.float32 for v in views)
    assert not torch.equal(views[0], views[1])
    assert float(views[0].min()) >= 0.0 and float(views[0].max()) <= 1.0  # no normalisation by default
    plain = eval_transform(config)(image)
    assert plain.shape == (3, 24, 24) and torch.equal(plain, eval_transform(config)(image))  # deterministic


def test_normalisation_and_blur_kernel():
    config = ViewsConfig(size=16, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    image = torch.full((3, 16, 16), 255, dtype=torch.uint8)
    assert torch.allclose(eval_transform(config)(image), torch.full((3, 16, 16), 2.0))  # (1 - 0.5) / 0.25
    assert [blur_kernel(s) for s in (28, 96, 224)] == [3, 9, 23]  # 10% of the side, odd
