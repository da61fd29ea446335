"""The unfamiliar-photo gate: its arithmetic, its tap on the network, and its file format."""
import pytest
import torch

from returns_model.gate import GateError, LayerTap, UnfamiliarGate, min_mahalanobis, total_variation
from returns_model.meta import ArchConfig
from returns_model.network import build_model
from training.gate_fit import choose_cutoff, fit_statistics, forward_with_tap


def test_min_mahalanobis_equals_the_direct_formula():
    g = torch.Generator().manual_seed(0)
    emb, means = torch.randn(7, 4, generator=g), torch.randn(3, 4, generator=g)
    a = torch.randn(4, 4, generator=g)
    precision = a @ a.T + torch.eye(4)
    direct = torch.stack([torch.stack([(e - m) @ precision @ (e - m) for m in means]).min() for e in emb])
    assert torch.allclose(min_mahalanobis(emb, means, precision), direct, atol=1e-4)


def test_total_variation_is_zero_for_flat_frames_and_high_for_stripes():
    flat = torch.full((1, 1, 28, 28), 128, dtype=torch.uint8)
    stripes = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    stripes[..., ::2] = 255
    assert float(total_variation(flat)) == 0.0 and float(total_variation(stripes)) > 0.9


def test_the_tap_sees_the_flip_averaged_block_output():
    model = build_model(ArchConfig(widths=(8, 16), depths=(1, 1), flip_average=True)).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        one = model.blocks[:2](model.stem(x)).mean((2, 3))
        mirrored = model.blocks[:2](model.stem(x.flip(3))).mean((2, 3))
        tap = LayerTap(model, "blocks.1")
        model(x)
        got = tap.pooled(3)
    assert torch.allclose(got, (one + mirrored) / 2, atol=1e-5)
    with pytest.raises(GateError, match="no forward pass"):
        tap.pooled(3)
    tap.close()
    with pytest.raises(GateError, match="no layer"):
        LayerTap(model, "blocks.9")


def fitted_gate() -> tuple[UnfamiliarGate, torch.nn.Module]:
    from returns_model.meta import PreprocessSpec

    g = torch.Generator().manual_seed(1)
    model = build_model(ArchConfig(widths=(8,), depths=(1,))).eval()
    images = torch.randint(0, 120, (400, 1, 28, 28), generator=g, dtype=torch.uint8)
    images[:, :, 6:22, 8:20] += 100  # a bright "garment" in the middle of a dark frame
    labels = torch.arange(400) % 2
    _, tapped = forward_with_tap(model, images, PreprocessSpec(), "blocks.0")
    gate = fit_statistics(tapped[:300], labels[:300], images[:300], "blocks.0", 2)
    return choose_cutoff(gate, tapped[300:], images[300:], rate=0.05), model


def test_cutoff_flags_the_chosen_share_of_held_out_photos_and_round_trips():
    gate, _ = fitted_gate()
    assert gate.info["flagged_share_at_cutoff"] <= 0.05 and gate.info["target_flag_rate"] == 0.05
    again = UnfamiliarGate.from_dict(gate.to_dict())
    emb = torch.randn(5, gate.dim)
    assert torch.equal(again.score(emb), gate.score(emb)) and again.cutoff == gate.cutoff
    with pytest.raises(GateError, match="format"):
        UnfamiliarGate.from_dict({**gate.to_dict(), "format": 99})
    with pytest.raises(GateError, match="missing"):
        UnfamiliarGate.from_dict({k: v for k, v in gate.to_dict().items() if k != "tv_q01"})


def test_a_gate_without_cutoff_refuses_to_flag_and_shapes_are_checked():
    gate, _ = fitted_gate()
    gate.cutoff = None
    with pytest.raises(GateError, match="no cutoff"):
        gate.flag(torch.zeros(3))
    with pytest.raises(GateError, match=r"features must be \[N, 8\]"):
        gate.score(torch.zeros(3, 5))
    with pytest.raises(GateError, match="images for"):
        gate.score(torch.zeros(3, 8), pixels=torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
