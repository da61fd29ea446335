"""Composites of a batch's garments (training/composite.py): what they are made of, and that training
against them teaches the network to answer them without confidence."""
import json
import math

import pytest
import torch

from training.composite import blends, composite_count, make_composites, tiles, uniform_loss


def _levels(n: int = 16) -> torch.Tensor:
    """A batch whose image i is flat at grey level 10 * (i + 1): a mix's level says what it was made of."""
    return (torch.arange(1, n + 1, dtype=torch.uint8) * 10).view(n, 1, 1, 1).expand(n, 1, 28, 28).contiguous()


def test_a_blend_mixes_two_different_images_between_35_and_65_percent():
    x = _levels()
    out = blends(x, 12, torch.Generator().manual_seed(0))
    assert out.shape == (12, 1, 28, 28)
    levels = set(range(10, 170, 10))
    for img in out:
        v = float(img[0, 0, 0])
        assert (img == img[0, 0, 0]).all()
        # v = lam * a + (1 - lam) * b with a != b and lam in [0.35, 0.65]: some such pair explains v
        assert any(a != b and min(a, b) + 0.35 * abs(a - b) - 1e-3 <= v <= min(a, b) + 0.65 * abs(a - b) + 1e-3
                   for a in levels for b in levels), v
        assert v not in levels or v == 0


def test_tiles_are_letterboxed_like_a_wide_or_tall_photo():
    x = torch.full((9, 1, 28, 28), 200, dtype=torch.uint8)
    out = tiles(x, 9, torch.Generator().manual_seed(0), fill=0.0)
    assert out.shape == (9, 1, 28, 28)
    side, stacked, grid = out[:3], out[3:6], out[6:]
    assert (side[:, :, :7] == 0).all() and (side[:, :, 21:] == 0).all()  # 28x56 -> 14 rows, padded above and below
    assert (side[:, :, 8:20] > 150).all()
    assert (stacked[:, :, :, :7] == 0).all() and (stacked[:, :, :, 21:] == 0).all()
    assert (grid > 150).all()  # 56x56 -> 28x28: no padding


def test_composites_are_seeded_photos_half_blends_half_tiles():
    x = torch.randint(0, 256, (128, 1, 28, 28), dtype=torch.uint8)
    a = make_composites(x, 32, torch.Generator().manual_seed(7))
    b = make_composites(x, 32, torch.Generator().manual_seed(7))
    assert a.dtype == torch.uint8 and a.shape == (32, 1, 28, 28) and torch.equal(a, b)
    assert not torch.equal(a, make_composites(x, 32, torch.Generator().manual_seed(8)))


def test_the_composite_count_is_a_share_of_the_batch_and_none_when_the_loss_is_off():
    assert composite_count(128, 0.5, 0.25) == 32 and composite_count(512, 0.5, 0.25) == 128
    assert composite_count(128, 0.0, 0.25) == 0


def test_the_uniform_loss_is_least_for_a_uniform_answer():
    assert uniform_loss(torch.zeros(4, 10)).item() == pytest.approx(math.log(10))
    assert uniform_loss(torch.tensor([[5.0] + [0.0] * 9])).item() > math.log(10) + 0.5


@pytest.mark.parametrize("args, says", [(["--composite-weight", "-1"], "--composite-weight -1.0: must be 0 (off)"),
                                        (["--composite-share", "0"], "--composite-share 0.0: must be above 0"),
                                        (["--composite-share", "1.5"], "--composite-share 1.5: must be above 0"),
                                        (["--batch-size", "1"], "--batch-size 1: composites pair a batch's garments")])
def test_composite_settings_that_cannot_work_are_refused_before_anything_runs(tmp_path, caplog, args, says):
    from training.train import main as train_main

    assert train_main(["--output", str(tmp_path / "m")] + args) == 1
    assert says in caplog.text
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_training_against_composites_lowers_confidence_on_them_not_on_garments(tmp_path, fmnist_test):
    """Two short runs, with and without composites (no drawn outliers, to see composites alone).
    Trained against them, the network ranks test-garment composites below ordinary test photos by
    confidence far more often, still learns the garments, and its trust report groups the
    composite kinds as trained against."""
    from returns_model.artifact import load_model
    from returns_model.preprocess import normalize
    from tests.test_training import TINY
    from training.train import main as train_main

    images, labels = fmnist_test
    x = images[:512].unsqueeze(1)
    comp = make_composites(x, 512, torch.Generator().manual_seed(1))
    ranked, accuracy = {}, {}
    for weight in ("0", "1"):
        out = tmp_path / f"w{weight}"
        args = TINY + ["--epochs", "2", "--no-int8", "--tsne-samples", "0", "--trust-photos", "10",
                       "--composite-weight", weight, "--drawn-share", "0", "--output", str(out)]
        assert train_main(args) == 0
        model, meta = load_model(out)
        with torch.no_grad():
            probs = [torch.softmax(model(normalize(b, meta.preprocess)), 1) for b in (x, comp)]
        garment, composite = (p.max(1).values for p in probs)
        ranked[weight] = float((garment[:, None] > composite[None, :]).float().mean())  # AUROC
        accuracy[weight] = float((probs[0].argmax(1) == labels[:512]).float().mean())
        groups = {k: v["group"] for k, v in json.loads((out / "trust.json").read_text())["unfamiliar_kinds"].items()}
        trained_against = weight == "1"
        assert (groups["collage"] == "trained_against") == trained_against
        assert (groups["double_exposure"] == "trained_against") == trained_against
        assert groups["receipt"] == "paper_and_print" and groups["inverted"] == "tuning"
    assert ranked["1"] >= 0.7 and ranked["1"] > ranked["0"] + 0.1, ranked  # measured: 0.60 without, 0.78 with
    assert accuracy["1"] > 0.5, accuracy  # chance is 0.1


def test_settings_recorded_before_composites_existed_mean_a_model_trained_without_them(tmp_path):
    """Release 1.0's train_config.json has no composite_weight: its trust report keeps the composite
    kinds held out, and a retrain of it adds no composites to its fine-tune."""
    from training import unfamiliar
    from training.config import TrainConfig
    from training.trust import trained_against

    old = TrainConfig().to_dict()
    del old["composite_weight"]
    (tmp_path / "train_config.json").write_text(json.dumps(old))
    assert TrainConfig.from_json(tmp_path / "train_config.json").composite_weight == 0.0
    assert trained_against(tmp_path) == frozenset()
    TrainConfig().write(tmp_path / "train_config.json")  # today's settings: trained with them
    assert set(unfamiliar.COMPOSITE_KINDS) <= trained_against(tmp_path)
    assert trained_against(tmp_path / "none") == frozenset()
