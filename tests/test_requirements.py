"""What a training set allows, from its counts: the arithmetic, the text, and returns-train's use of it."""
import json
import logging
from pathlib import Path

import pytest
import torch

from returns_model.gate import GateError
from returns_model.meta import ArchConfig, PreprocessSpec
from tests.conftest import encode
from training import train as train_mod
from training.certify import certify_threshold, min_accepted
from training.config import TrainConfig
from training.data import Dataset, Split, held_out_test_size, held_out_val_size
from training.gate_fit import choose_cutoff, embedding_width, fit_statistics
from returns_model.names import DATA_REQUIREMENTS_FILE as REPORT_FILE
from training.requirements import Holdout, assess, for_run, plan_image_folder, render

REPO = Path(__file__).resolve().parents[1]
SHOP = TrainConfig(image_folder="photos", channels=3, image_size=64)  # the README's shop command


def flat(text: str) -> str:
    """The report's words without its line wrapping."""
    return " ".join(text.split())


def twelve(per_class: int) -> dict[str, int]:
    return {f"category{i:02d}": per_class for i in range(12)}


def test_a_hundred_photos_a_class_cannot_certify_with_the_default_split():
    req = plan_image_folder(twelve(100), SHOP)
    # 1,200 photos: 120 held out for test, then a tenth of the 1,080 left for validation
    assert (sum(req.train_counts.values()), req.validation) == (972, 108)
    assert req.gate_dim == req.gate_min_per_class == 48 and not req.gate_short and req.can_finish
    assert req.min_accepted == min_accepted(1 - 0.99, 0.05) == 299
    assert req.gate_flagged == 2 and req.min_validation == 305  # 305 less its 6 flagged photos is 299
    assert not req.certifiable and req.accepted_share > 1
    assert req.validation_to_add == 305 - 108
    assert req.holdout == Holdout(5000, image_folder=True, test_held_out=True)
    # the smallest train/ whose own hold-out gives 305 validation photos
    n = req.train_folder_needed
    assert n == 3388
    assert held_out_val_size(n - held_out_test_size(n), 5000) == 305
    assert held_out_val_size(n - 1 - held_out_test_size(n - 1), 5000) == 304


def test_six_hundred_photos_a_class_can_certify():
    req = plan_image_folder(twelve(600), SHOP)
    assert req.validation == 648 and req.certifiable and req.validation_to_add == 0
    assert req.accepted_share == pytest.approx(299 / 648)
    assert min(req.train_counts.values()) >= 48


def test_a_val_folder_is_validation_as_it_is():
    req = plan_image_folder(twelve(100), SHOP, val_photos=200, test_folder=True)
    assert set(req.train_counts.values()) == {100} and req.validation == 200 and req.holdout is None
    assert req.validation_to_add == 105 and not req.certifiable
    assert "add 105 photos to val/ (it needs 305)" in flat(render(req))
    assert plan_image_folder(twelve(100), SHOP, val_photos=305, test_folder=True).certifiable


def test_more_errors_need_more_accepted_photos_and_the_walk_agrees():
    req = assess({"a": 100, "b": 100}, 1000, target_precision=0.99, delta=0.05, unfamiliar_rate=0.02,
                 gate_layer="blocks.3", gate_dim=48)
    assert req.accepted_needed == [299, 473, 628]
    # the certificate's own walk: 299 right photos are certified, 298 are not
    for n, certified in ((299, True), (298, False)):
        cert = certify_threshold(torch.ones(n), torch.ones(n, dtype=torch.bool))
        assert cert.accept_nothing is not certified


def test_short_classes_stop_the_run_however_large_validation_is():
    req = assess({"bags": 47, "belts": 48}, 10_000, target_precision=0.99, delta=0.05, unfamiliar_rate=0.02,
                 gate_layer="blocks.3", gate_dim=48)
    assert req.gate_short == {"bags": 1} and not req.can_finish and not req.certifiable
    text = flat(render(req))
    assert "1 short: 'bags' has 47" in text and "Cannot finish a run" in text


def test_the_minimums_are_what_the_gate_fit_enforces():
    dim, rate = 4, 0.02
    req = assess({"a": dim, "b": dim}, 49, target_precision=0.99, delta=0.05, unfamiliar_rate=rate,
                 gate_layer="x", gate_dim=dim)
    assert req.gate_min_per_class == dim and req.cutoff_min_validation == 50 and not req.can_finish
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (2 * dim, 1, 8, 8), dtype=torch.uint8, generator=g)
    emb = torch.randn(2 * dim, dim, generator=g)
    with pytest.raises(GateError, match=f"at least {dim} training photos"):
        fit_statistics(emb[1:], torch.tensor([0] * (dim - 1) + [1] * dim), pixels[1:], "x", 2)
    gate = fit_statistics(emb, torch.tensor([0] * dim + [1] * dim), pixels, "x", 2)
    held = torch.randn(50, dim, generator=g)
    held_pixels = torch.randint(0, 256, (50, 1, 8, 8), dtype=torch.uint8, generator=g)
    with pytest.raises(GateError, match="needs at least 50"):
        choose_cutoff(gate, held[:49], held_pixels[:49], rate)
    assert choose_cutoff(gate, held, held_pixels, rate).info["flagged_share_at_cutoff"] <= rate


def test_the_gates_width_is_the_tapped_blocks_and_the_release_gate_has_it():
    meta = json.loads((REPO / "models" / "release" / "model.json").read_text())
    arch, layer = ArchConfig.from_dict(meta["arch"]), meta["unfamiliar"]["layer"]
    width = embedding_width(arch, PreprocessSpec(), layer)
    assert width == len(meta["unfamiliar"]["means"][0]) == 48
    assert embedding_width(arch, PreprocessSpec(), "blocks.0") == arch.widths[0]
    with pytest.raises(GateError, match="no layer"):
        embedding_width(arch, PreprocessSpec(), "blocks.9")


def test_bad_settings_are_refused_with_what_is_allowed():
    with pytest.raises(ValueError, match=r"target_precision must be in \(0, 1\), got 1.0.*delta must be"):
        assess({"a": 1, "b": 1}, 10, target_precision=1.0, delta=0.0, unfamiliar_rate=0.02, gate_layer="x",
               gate_dim=4)


def test_the_text_says_what_is_possible_and_what_to_add():
    short = flat(render(plan_image_folder(twelve(100), SHOP)))
    assert "validation 108 photos (held out of train/" in short
    assert "Cannot certify precision 0.99 at delta 0.05" in short and "every photo would go to review" in short
    assert "a val/ folder of at least 305 photos" in short and "3,388 photos in train/ (about 283 a class)" in short
    fine = flat(render(plan_image_folder(twelve(600), SHOP)))
    assert "Can certify precision 0.99 at delta 0.05, if the model auto-accepts at least 299 of the 648" in fine
    assert "(46%)" in fine and "Cannot" not in fine


def test_a_loaded_dataset_is_counted_by_class_and_its_report_is_json():
    labels = torch.tensor([0] * 60 + [1] * 50)
    split = Split(torch.zeros(len(labels), 1, 8, 8, dtype=torch.uint8), labels)
    ds = Dataset(split, split.subset(torch.arange(40)), split, ["bags", "belts"], "fashion-mnist:x", "0" * 64,
                 held_out=("val",))
    cfg = TrainConfig(val_size=40, widths=(8, 16), depths=(1, 1))
    spec = PreprocessSpec(channels=1, size=8, mean=(0.5,), std=(0.5,))
    req = for_run(ds, cfg, ArchConfig(widths=(8, 16), depths=(1, 1), num_classes=2), spec)
    assert req.train_counts == {"bags": 60, "belts": 50} and req.gate_dim == 16 and req.validation == 40
    assert req.holdout == Holdout(40, image_folder=False) and req.train_folder_needed is None
    assert "hold out at least 305 (--val-size 305)" in flat(render(req))
    assert json.loads(json.dumps(req.to_dict()))["min_validation"] == 305


def test_the_training_guide_shows_the_reports_real_output():
    guide = (REPO / "docs" / "training.md").read_text()
    for per_class in (100, 600):
        assert render(plan_image_folder(twelve(per_class), SHOP)) in guide, per_class
    req, text = plan_image_folder(twelve(600), SHOP), flat(guide)
    n0, n1, n2 = req.accepted_needed
    for fact in (f"(`{req.gate_layer}`, {req.gate_dim} channels wide",
                 f"at least {req.cutoff_min_validation} validation photos",
                 f"needs at least {n0} auto-accepted validation photos without an error, {n1} with one error, "
                 f"{n2} with two", f"validation needs at least {req.min_validation} photos"):
        assert fact in text, fact


# --- returns-train -------------------------------------------------------------------------------
TINY = ["--widths", "16", "32", "--depths", "1", "1", "--image-size", "8", "--channels", "3", "--batch-size", "16",
        "--epochs", "1", "--no-compile", "--no-progress", "--no-int8", "--tsne-samples", "0"]


def photo_folder(root: Path, counts: dict[str, dict[str, int]]) -> Path:
    """``root/<split>/<class>/<i>.png``: small random colour photos."""
    g = torch.Generator().manual_seed(0)
    for split, per_class in counts.items():
        for name, n in per_class.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                px = torch.randint(0, 256, (8, 8, 3), dtype=torch.uint8, generator=g)
                (folder / f"{i}.png").write_bytes(encode(px))
    return root


class Stop(Exception):
    """Raised where the network would be built: everything before training has happened."""


def test_returns_train_reports_and_writes_the_requirements_before_training(tmp_path, monkeypatch, capsys, caplog):
    # the tiny network's gate reads blocks.1, 32 wide: 40 training photos a class, 52 for validation
    photos = photo_folder(tmp_path / "photos", {"train": {"bags": 40, "belts": 40}, "val": {"bags": 26, "belts": 26},
                                                "test": {"bags": 5, "belts": 5}})

    def refuse(arch):
        raise Stop

    monkeypatch.setattr(train_mod, "build_model", refuse)
    out = tmp_path / "m"
    with caplog.at_level(logging.WARNING, "training"), pytest.raises(Stop):
        train_mod.main(TINY + ["--image-folder", str(photos), "--output", str(out)])
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["train_counts"] == {"bags": 40, "belts": 40} and report["validation"] == 52
    assert report["gate_dim"] == 32 and report["can_finish"] and not report["certifiable"]
    assert "Cannot certify precision 0.99 at delta 0.05" in flat(capsys.readouterr().out)
    assert "training anyway (--require-certifiable stops here instead)" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == [REPORT_FILE]


@pytest.mark.parametrize("case", ["not certifiable", "gate short"])
def test_returns_train_refuses_before_training_with_exit_code_2(tmp_path, capsys, caplog, case):
    per_class = 40 if case == "not certifiable" else 20
    photos = photo_folder(tmp_path / "photos", {"train": {"bags": per_class, "belts": per_class},
                                                "val": {"bags": 26, "belts": 26}})
    out = tmp_path / "m"
    args = TINY + ["--image-folder", str(photos), "--output", str(out)]
    if case == "not certifiable":
        args.append("--require-certifiable")
    assert train_mod.main(args) == 2
    assert "Data: 2 classes" in flat(capsys.readouterr().out)
    assert ("--require-certifiable: cannot certify" if case == "not certifiable"
            else "the unfamiliar-photo gate cannot be fitted") in caplog.text
    assert not out.exists()
