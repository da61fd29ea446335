"""The one training recipe (training/recipe.py): the batch it builds, the step's guards, and that
training and fine-tuning both go through it rather than restating it."""
from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

from returns_model.preprocess import PreprocessSpec
from training.config import TrainConfig
from training.recipe import TrainingDiverged, train_step, training_batch

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


def _photos(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8), torch.arange(n) % 10


def test_a_batch_holds_its_photos_then_composites_normalised_and_channels_last():
    images, labels = _photos()
    cfg = TrainConfig(composite_share=0.25, drawn_share=0.0)
    batch = training_batch(images, labels, PreprocessSpec(), cfg, CPU, torch.Generator().manual_seed(0))
    assert batch.composites == 2 and batch.x.shape == (10, 1, 28, 28) and batch.x.dtype == torch.float32
    assert torch.equal(batch.y, labels) and batch.pasted is None and batch.unpasted is None
    assert batch.x.is_contiguous(memory_format=torch.channels_last)
    again = training_batch(images, labels, PreprocessSpec(), cfg, CPU, torch.Generator().manual_seed(0))
    assert torch.equal(batch.x, again.x)  # every draw from the given generator
    plain = training_batch(images, labels, PreprocessSpec(), TrainConfig(composite_weight=0.0), CPU,
                           torch.Generator().manual_seed(0))
    assert plain.composites == 0 and len(plain.x) == 8


def test_paste_sees_the_cropped_and_flipped_photos_before_composites_and_they_are_kept():
    images, labels = _photos()
    seen = {}

    def paste(x):
        seen["x"] = x
        moved = torch.zeros(len(x), dtype=torch.bool)
        moved[:3] = True
        out = x.clone()
        out[moved] = 255
        return out, moved

    cfg = TrainConfig(erasing_p=0.0, composite_weight=0.0)
    batch = training_batch(images, labels, PreprocessSpec(), cfg, CPU, torch.Generator().manual_seed(0), paste=paste)
    assert seen["x"] is batch.unpasted and seen["x"].dtype == torch.uint8
    assert not torch.equal(seen["x"], images)  # cropped and flipped first
    assert batch.pasted.tolist() == [True] * 3 + [False] * 5
    assert (batch.x[:3] == batch.x[0, 0, 0, 0]).all()  # the pasted photos, normalised


def _tiny():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 10))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def test_a_non_finite_loss_stops_the_step_before_the_weights_move():
    model, opt, sched = _tiny()
    before = [p.detach().clone() for p in model.parameters()]
    batch = training_batch(*_photos(), PreprocessSpec(), TrainConfig(), CPU, torch.Generator().manual_seed(0))
    with pytest.raises(TrainingDiverged, match=r"loss is nan at epoch 2, step 7; lower --lr \(now 0.1\)"):
        train_step(model, model, opt, sched, batch, TrainConfig(), CPU, lr=0.1, where="epoch 2, step 7",
                   extra_loss=lambda out: torch.tensor(math.nan))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_clipping_caps_the_step_and_extra_loss_adds_to_the_loss():
    batch = training_batch(*_photos(), PreprocessSpec(), TrainConfig(), CPU, torch.Generator().manual_seed(0))
    steep = lambda out: 1e4 * out.square().mean()  # noqa: E731  (a loss with a huge gradient)
    moves = {}
    for clip in (None, 1.0):
        model, opt, sched = _tiny()
        before = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
        loss, out = train_step(model, model, opt, sched, batch, TrainConfig(), CPU, lr=1.0, where="test",
                               clip_norm=clip, extra_loss=steep)
        moves[clip] = float((torch.nn.utils.parameters_to_vector(model.parameters()).detach() - before).norm())
        assert out.shape == (8, 10) and loss > 1.0
    assert moves[1.0] <= 1.0 + 1e-5 < moves[None]  # SGD at lr 1: the step is the (clipped) gradient


def _calls(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            f = node.func
            names.add(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""))
    return names


def test_training_and_fine_tuning_both_step_through_the_recipe_and_restate_none_of_it():
    recipe_only = {"random_crop", "random_erasing", "uniform_loss", "make_composites", "autocast",
                   "clip_grad_norm_", "backward"}
    for loop in ("train.py", "finetune.py"):
        calls = _calls(REPO / "training" / loop)
        assert {"training_batch", "train_step"} <= calls, loop
        assert not calls & recipe_only, (loop, calls & recipe_only)
