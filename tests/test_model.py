"""The SE-ResNet's inference-time flip averaging: exact, eval-only, and off for old model.json files."""
import json

import torch

from returns_model.meta import ArchConfig
from returns_model.network import build_model


def _model(flip_average: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ArchConfig(widths=(8, 16), depths=(1, 1), dropout=0.0, flip_average=flip_average))


def test_flip_average_is_the_mean_of_both_views_logits():
    model = _model(True).eval()
    x = torch.randn(5, 1, 28, 28)
    with torch.inference_mode():
        got = model(x)
        single = model.head(model.embed(x)), model.head(model.embed(x.flip(3)))
    assert torch.allclose(got, (single[0] + single[1]) / 2, atol=1e-5)
    assert not torch.allclose(got, single[0], atol=1e-3)  # the mirror view really changes the answer


def test_flip_average_is_the_same_in_channels_last_and_per_image():
    model = _model(True).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.inference_mode():
        batch = model(x.contiguous(memory_format=torch.channels_last))
        one_by_one = torch.cat([model(x[i:i + 1]) for i in range(4)])
    assert torch.allclose(batch, one_by_one, atol=1e-5)  # eval-mode BN: no mixing between images


def test_training_mode_sees_only_the_given_images():
    model = _model(True).train()
    x = torch.randn(6, 1, 28, 28)
    assert model.features(x).shape == (6, 16)
    plain = _model(False).train()
    assert torch.allclose(model.features(x), plain.features(x))


def test_model_json_without_the_field_loads_without_flip_averaging():
    d = ArchConfig().to_dict()
    del d["flip_average"]  # written before the field existed
    assert ArchConfig.from_dict(json.loads(json.dumps(d))).flip_average is False
