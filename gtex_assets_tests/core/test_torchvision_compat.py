import torch

from gtex_assets.core.torchvision_compat import models, torchvision, transforms_v2


def test_models_and_transforms_work_beside_cpu_torch():
    m = models.efficientnet_b0(weights=None).eval()
    with torch.inference_mode():
        out = m(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, 1000)
    t = transforms_v2.RandomHorizontalFlip(p=1.0)
    x = torch.arange(6, dtype=torch.float32).reshape(1, 2, 3)
    assert torch.equal(t(x), x.flip(-1))
    assert torchvision.__version__.startswith("0.28")
