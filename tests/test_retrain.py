"""The loop end to end on a tiny model: retrain on decisions (lineage, held-out split, the gate's
new modes), champion vs challenger (comparison.json, promotion into a new version folder), a worse
challenger refused, and a bad decisions file that never changes a model."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from returns_feedback.decisions import decisions_hash, read_decisions, split_hash
from returns_model.artifact import load_model, save_weights
from returns_model.meta import read_meta
from training import compare as cmp
from training.backdrop import SETUP_NAME
from training.decided import load_heldout
from training.lineage import lineage_drift, weights_sha256
from training.paired import paired_bootstrap
from training.promotion import decide, precision_below_p_value, promotion_of
from training.retrain import main as retrain_main
from training.retrain_config import next_version
from training.train import main as train_main

TINY = ["--train-subset", "3000", "--val-size", "1000", "--widths", "16", "32", "--depths", "1", "1",
        "--batch-size", "64", "--tsne-samples", "0", "--no-progress", "--no-compile", "--trust-photos", "20"]
WHEN = "2024-05-02T09:14:00Z"


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    """A tiny champion, 150 decided photos in a new setup (plus a few that are no product), and a retrain."""
    from scripts.demo_feedback import studio_shot
    from training import unfamiliar
    from training.data import FASHION_MNIST_CLASSES, read_idx, DEFAULT_FASHION_MNIST_DIR

    root = tmp_path_factory.mktemp("loop")
    assert train_main(TINY + ["--epochs", "1", "--model-version", "1.1", "--output", str(root / "champion")]) == 0
    images, _ = read_idx(DEFAULT_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz")
    labels, _ = read_idx(DEFAULT_FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz")
    idx = np.arange(50000, 50150)
    photos = root / "archive"
    rows = []
    for j, (i, data) in enumerate(zip(idx, studio_shot(images.numpy(), idx, seed=3))):
        (photos / "booth").mkdir(parents=True, exist_ok=True)
        (photos / "booth" / f"{j}.png").write_bytes(data)
        (photos / "copy").mkdir(exist_ok=True)
        if j < 5:  # the same photo archived twice is one photo
            (photos / "copy" / f"{j}.png").write_bytes(data)
        rows.append((hashlib.sha256(data).hexdigest(), FASHION_MNIST_CLASSES[int(labels[i])]))
    for j, data in enumerate(unfamiliar.make("noise", 12, seed=1)):
        (photos / "odd").mkdir(exist_ok=True)
        (photos / "odd" / f"{j}.png").write_bytes(data)
        rows.append((hashlib.sha256(data).hexdigest(), "not_a_product" if j < 10 else "unsure"))
    decisions = root / "decisions.jsonl"
    decisions.write_text("".join(json.dumps({"format_version": 1, "sha256": h, "label": lab, "reviewer": "ana",
                                             "decided_at": WHEN}) + "\n" for h, lab in rows))
    cand = root / "candidate"
    code = retrain_main(["--champion", str(root / "champion"), "--decisions", str(decisions), "--photos", str(photos),
                         "--output", str(cand), "--epochs", "1", "--replay", "500", "--gate-photos", "0",
                         "--trust-photos", "10", "--holdout-share", "0.3", "--no-progress"])
    assert code == 0
    return {"root": root, "champion": root / "champion", "candidate": cand, "decisions": decisions, "photos": photos}


@pytest.mark.slow
def test_retrain_writes_a_candidate_with_lineage(loop):
    meta = read_meta(loop["candidate"])
    lineage = meta.lineage
    assert meta.model_version == next_version(read_meta(loop["champion"]).model_version) == "1.2"
    assert lineage["parent_weights_sha256"] == weights_sha256(loop["champion"])
    assert lineage["decisions_sha256"] == decisions_hash(read_decisions([loop["decisions"]]).decisions)
    heldout = [json.loads(x) for x in (loop["candidate"] / "heldout.jsonl").read_text().splitlines()]
    assert lineage["heldout_sha256"] == split_hash(r["sha256"] for r in heldout)
    c = lineage["counts"]
    assert c["decided"] == 162 and c["unsure_not_used"] == 2
    assert c["train_products"] + c["heldout_products"] == 150 and 20 < c["heldout_products"] < 70
    assert c["train_not_a_product"] + c["heldout_not_a_product"] == 10
    assert len(heldout) == c["heldout_products"] + c["heldout_not_a_product"]
    saved = json.loads((loop["candidate"] / "lineage.json").read_text())
    assert saved["weights_sha256"] == weights_sha256(loop["candidate"])
    # the decided booth photos lent their backdrops to the fine-tune, and the threshold is certified
    # on validation garments shown on them as well as on ordinary validation photos
    assert lineage["fine_tune"]["backdrop_share"] == 0.3
    # the champion is a trained release: it is the lineage's root, with the accuracy its report measured
    champion_accuracy = json.loads((loop["champion"] / "metrics.json").read_text())["accuracy"]
    assert lineage["root"] == {"model_version": read_meta(loop["champion"]).model_version,
                               "weights_sha256": weights_sha256(loop["champion"]), "test_accuracy": champion_accuracy}
    assert 0.9 * c["train_products"] <= lineage["fine_tune"]["new_setup_backdrops"] <= c["train_products"]
    cert = meta.certificate
    setup = cert["setups"][SETUP_NAME]
    assert setup["n_calibration"] == cert["n_calibration"] == 1000  # every validation garment, once
    assert meta.threshold == cert["threshold"] == setup["threshold"]  # both stated at the served threshold
    assert setup["accept_nothing"] or setup["precision_lower_bound"] >= 0.99
    gate = meta.unfamiliar
    assert gate["info"]["decided_modes"]["decided_photos"] == c["train_products"]
    assert len(gate["means"]) == 10 + gate["info"]["decided_modes"]["modes_added"]
    load_model(loop["candidate"])  # the served code path rebuilds it


@pytest.mark.slow
def test_the_candidate_has_an_int8_path_that_learnt_the_same_decisions(loop):
    """A promoted candidate keeps the fast CPU path: its int8 gate learns the decided photos too."""
    from handler.core import Classifier
    from returns_model.artifact import read_int8_graph

    meta = read_meta(loop["candidate"])
    c, int8 = meta.lineage["counts"], meta.int8
    assert read_int8_graph(loop["candidate"], meta) is not None  # the graph is there and its SHA-256 matches
    learnt = int8["unfamiliar"]["info"]
    assert learnt["decided_modes"]["decided_photos"] == c["train_products"]
    assert learnt["not_a_product"]["photos"] == c["train_not_a_product"]
    assert len(int8["unfamiliar"]["means"]) == 10 + learnt["decided_modes"]["modes_added"]
    # the int8 rule is certified on the new setup's calibration photos too, at its own served threshold
    cert = int8["calibration"]["certificate"]
    assert cert["setups"][SETUP_NAME]["threshold"] == cert["threshold"] == int8["calibration"]["threshold"]
    assert cert["setups"][SETUP_NAME]["n_calibration"] == 1000
    clf = Classifier(loop["candidate"], warmup=False, cpu_backend="onnx-int8")
    assert clf.backend == "onnx-int8" and clf.meta.threshold == int8["calibration"]["threshold"]


@pytest.mark.slow
def test_compare_writes_comparison_and_promotes_into_a_new_version(loop, tmp_path):
    versions = tmp_path / "versions"
    code = cmp.main(["--champion", str(loop["champion"]), "--challenger", str(loop["candidate"]),
                     "--promote-to", str(versions)])
    result = json.loads((loop["candidate"] / "comparison.json").read_text())
    assert (loop["candidate"] / "comparison.png").stat().st_size > 0
    assert set(result["sets"]) == {"test", "heldout", "heldout_not_a_product"}
    test = result["sets"]["test"]
    assert test["n"] == 10000 and len(test["per_class_accuracy_change"]) == 10
    lo, hi = test["difference"]["accuracy"]["ci95"]
    assert lo <= test["difference"]["accuracy"]["value"] <= hi
    assert result["challenger"]["lineage"]["parent_weights_sha256"] == weights_sha256(loop["champion"])
    assert "gate" not in result and promotion_of(result) is result["promotion"]
    names = [c["name"] for c in result["promotion"]["checks"]]
    assert names == ["test_accuracy_within_tolerance", "certified_promise_holds_on_test", "threshold_certified",
                     "better_on_heldout", "not_a_product_stays_in_review"]
    if result["promotion"]["promote"]:
        assert code == 0 and read_meta(versions / "1.2").lineage == read_meta(loop["candidate"]).lineage
    else:
        assert code == 3 and not versions.exists() and result["promotion"]["reason"].startswith("kept the champion")


@pytest.mark.slow
def test_promotion_refuses_a_worse_challenger(loop, tmp_path):
    model, meta = load_model(loop["candidate"])
    worse = tmp_path / "worse"
    worse.mkdir()
    for name in ("model.json", "train_config.json", "heldout.jsonl"):
        (worse / name).write_bytes((loop["candidate"] / name).read_bytes())
    with torch.no_grad():  # scramble the head: a challenger that forgot what it knew
        model.head.weight.copy_(model.head.weight[torch.randperm(10, generator=torch.Generator().manual_seed(0))])
    save_weights(model, worse)
    # The copied float probe records the candidate's answers, which these weights no longer give: a server
    # refuses such a folder at start-up (tests/test_served_rule.py). Without a probe it is served unchecked.
    doc = json.loads((worse / "model.json").read_text())
    del doc["probe"]
    (worse / "model.json").write_text(json.dumps(doc))
    from training.data import FASHION_MNIST_CLASSES  # noqa: F401  (the test split's classes)
    test = load_data_test(meta)
    sets = load_heldout(worse, [], meta.class_names, meta.preprocess)
    result = cmp.compare(loop["champion"], worse, test, sets)
    assert not result["promotion"]["promote"]
    failed = {c["name"] for c in result["promotion"]["checks"] if not c["passed"]}
    assert "test_accuracy_within_tolerance" in failed and "test accuracy" in result["promotion"]["reason"]


def load_data_test(meta, n: int = 2000):
    from training.config import TrainConfig
    from training.data import load_data

    ds = load_data(TrainConfig(train_subset=100, val_size=100), meta.preprocess)
    return ds.test.images[:n], ds.test.labels[:n]


@pytest.mark.slow
def test_bad_decisions_never_change_a_model(loop, tmp_path, capsys):
    good = loop["decisions"].read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([good[0], good[1].replace('"label": "', '"label": "Jumper'), good[2][:40]]))
    out = tmp_path / "never"
    before = weights_sha256(loop["champion"])
    code = retrain_main(["--champion", str(loop["champion"]), "--decisions", str(bad), "--photos", str(loop["photos"]),
                         "--output", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert f"{bad}:2: unknown_label" in err and f"{bad}:3: truncated" in err
    assert "nothing was trained or written" in err
    assert weights_sha256(loop["champion"]) == before


@pytest.mark.slow
def test_a_fine_tune_that_diverges_stops_with_exit_1_and_writes_nothing(loop, tmp_path, caplog):
    """The recipe's finite-loss check guards fine-tuning as it guards training: no half-written candidate."""
    out = tmp_path / "diverged"
    code = retrain_main(["--champion", str(loop["champion"]), "--decisions", str(loop["decisions"]),
                         "--photos", str(loop["photos"]), "--output", str(out), "--epochs", "1", "--replay", "500",
                         "--lr", "1e12", "--no-progress", "--no-int8"])
    assert code == 1 and not out.exists()
    assert "fine-tune stopped, nothing written: loss is" in caplog.text and "lower --lr (now 1000000000000.0)" in caplog.text


def _set(acc1, acc2, prec1, prec2, ca_ci, n=1000, acc_diff=None, accepted=0):
    stats = lambda acc, prec: {"accuracy": acc, "precision": prec, "coverage": 0.8, "accepted": accepted,  # noqa: E731
                               "errors_accepted": round(accepted * (1 - prec))}
    return {"n": n, "champion": stats(acc1, prec1), "challenger": stats(acc2, prec2),
            "difference": {"accuracy": {"value": acc2 - acc1 if acc_diff is None else acc_diff},
                           "correct_accepted": {"value": sum(ca_ci) / 2, "ci95": list(ca_ci)}}}


def test_the_promotion_checks_promote_only_a_better_challenger_and_say_why():
    good = {"sets": {"test": _set(0.942, 0.941, 0.991, 0.992, (0, 0)),
                     "heldout": _set(0.30, 0.85, 0.0, 0.99, (0.40, 0.60))}}
    verdict = decide(good, target=0.99, tolerance=0.003, certified=True)
    assert verdict["promote"] and verdict["reason"] == "every check passed"
    worse = {"sets": {"test": _set(0.942, 0.935, 0.991, 0.985, (0, 0)),
                      "heldout": _set(0.30, 0.32, 0.0, 0.99, (-0.02, 0.05))}}
    verdict = decide(worse, target=0.99, tolerance=0.003, certified=False)
    assert not verdict["promote"]
    assert {c["name"] for c in verdict["checks"] if not c["passed"]} == {
        "test_accuracy_within_tolerance", "certified_promise_holds_on_test", "threshold_certified", "better_on_heldout"}
    assert verdict["reason"].startswith("kept the champion: test accuracy -0.70 points (tolerance -0.3)")
    no_heldout = {"sets": {"test": _set(0.942, 0.942, 0.991, 0.991, (0, 0))}}
    assert "no held-out decided photos" in decide(no_heldout, 0.99, 0.003, True)["reason"]


def test_promotion_refuses_a_challenger_that_auto_accepts_the_new_setup_at_low_precision():
    """Better on the held-out decisions by coverage, but 5 wrong of 23 auto-accepted: at a true 99%
    precision that many errors would happen with probability ~1e-5, so the promise is shown broken."""
    test = _set(0.942, 0.941, 0.991, 0.992, (0, 0))
    sloppy = {"sets": {"test": test, "heldout": _set(0.30, 0.80, 0.0, 18 / 23, (0.20, 0.45), accepted=23)}}
    verdict = decide(sloppy, target=0.99, tolerance=0.003, certified=True)
    failed = [c for c in verdict["checks"] if not c["passed"]]
    assert not verdict["promote"] and [c["name"] for c in failed] == ["promise_not_broken_on_heldout"]
    assert "5 wrong of 23" in failed[0]["detail"] and "precision 78.3%" in failed[0]["detail"]
    one_slip = {"sets": {"test": test, "heldout": _set(0.30, 0.85, 0.0, 17 / 18, (0.20, 0.45), accepted=18)}}
    assert decide(one_slip, target=0.99, tolerance=0.003, certified=True)["promote"]  # p = 0.165: no proof
    assert precision_below_p_value(0, 50, 0.99) == 1.0
    assert precision_below_p_value(1, 18, 0.99) == pytest.approx(1 - 0.99 ** 18)
    assert precision_below_p_value(5, 23, 0.99) < 1e-4


def test_a_comparison_written_when_the_verdict_was_called_gate_is_read():
    verdict = {"promote": False, "reason": "kept the champion: test accuracy -0.70 points (tolerance -0.3)"}
    assert promotion_of({"promotion": verdict}) is verdict
    assert promotion_of({"gate": verdict, "sets": {}}) is verdict
    assert promotion_of({"promotion": verdict, "gate": {"promote": True}}) is verdict


def test_paired_bootstrap_interval_covers_the_difference():
    a = torch.tensor([1, 0, 1, 1, 0, 1, 0, 1] * 50, dtype=torch.bool)
    b = a.clone()
    b[:40] = True
    d = paired_bootstrap(a, b, draws=500)
    assert d["value"] == pytest.approx((b.double() - a.double()).mean().item())
    assert 0 < d["ci95"][0] < d["value"] < d["ci95"][1]


def test_backdrop_transfer_is_off_with_a_warning_when_the_training_photos_have_no_plain_backdrop(caplog):
    from training.data import Dataset, Split
    from training.backdrop import new_setup
    from training.retrain_config import RetrainConfig

    noisy = Split(torch.randint(0, 256, (300, 1, 28, 28), dtype=torch.uint8), torch.arange(300) % 10)
    ds = Dataset(noisy, noisy, noisy, [str(i) for i in range(10)], "test", "0" * 64)
    booth = Split(torch.full((20, 1, 28, 28), 180, dtype=torch.uint8), torch.arange(20) % 10)
    assert new_setup(booth, ds, RetrainConfig().backdrop_share, seed=0) == (None, {})
    assert "backdrop transfer off" in caplog.text and "borders vary" in caplog.text
    assert new_setup(booth, ds, 0, seed=0) == (None, {})


def test_interpolate_takes_a_share_of_the_fine_tuned_weights_and_the_rest_of_the_champion():
    from training.finetune import interpolate

    torch.manual_seed(0)
    net = lambda: torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))  # noqa: E731
    champion, tuned = net(), net()
    tuned.train()(torch.randn(16, 3))  # moves the batch-norm statistics and counts one batch
    start = {k: v.clone() for k, v in champion.state_dict().items()}
    before = {k: v.clone() for k, v in tuned.state_dict().items()}
    interpolate(start, tuned, 0.7)
    after = tuned.state_dict()
    for k, v in before.items():
        if v.is_floating_point():
            assert torch.allclose(after[k], 0.7 * v + 0.3 * start[k], atol=1e-6), k
    assert after["1.num_batches_tracked"] == before["1.num_batches_tracked"] == 1
    interpolate(start, tuned, 1.0)
    assert all(torch.equal(tuned.state_dict()[k], after[k]) for k in after)
    with pytest.raises(ValueError, match="different layers"):
        interpolate({"0.weight": start["0.weight"]}, tuned, 0.5)


@pytest.mark.parametrize("share", [0.0, -0.2, 1.5])
def test_retrain_refuses_an_interpolation_outside_zero_to_one(share, capsys):
    code = retrain_main(["--champion", "models/release", "--decisions", "d.jsonl", "--photos", "p", "--output",
                         "build/never", "--interpolate", str(share)])
    assert code == 2 and f"--interpolate {share}: must be in (0, 1]" in capsys.readouterr().err


def test_promotions_that_add_up_are_reported_against_the_lineage_root_and_can_be_refused(tmp_path):
    """Each step within 0.3 points of its champion, 0.45 in all against the first release: reported
    always, refused only with a lineage tolerance."""
    from training.lineage import lineage_root

    cand = tmp_path / "1.4"
    cand.mkdir()
    (cand / "metrics.json").write_text(json.dumps({"accuracy": 0.9420}))
    root = {"model_version": "1.1", "weights_sha256": "a" * 64, "test_accuracy": 0.9465}
    drift = lineage_drift(cand, {"root": root, "parent_model_version": "1.3"})
    assert drift["root_version"] == "1.1" and drift["change"] == pytest.approx(-0.0045)
    step = {"sets": {"test": _set(0.9422, 0.9420, 0.997, 0.998, (0, 0)),
                     "heldout": _set(0.30, 0.85, 0.0, 0.99, (0.40, 0.60))}, "lineage_drift": drift}
    assert decide(step, 0.99, 0.003, True)["promote"]  # reported, not checked, by default
    verdict = decide(step, 0.99, 0.003, True, lineage_tolerance=0.003)
    assert not verdict["promote"]
    assert verdict["reason"] == ("kept the champion: test accuracy -0.45 points against 1.1, the lineage's first "
                                 "release (tolerance -0.3)")
    assert decide(step, 0.99, 0.003, True, lineage_tolerance=0.005)["promote"]
    # a model without a lineage root (or without metrics) has nothing to compare with: the check refuses
    assert lineage_drift(cand, None) is None and lineage_drift(tmp_path / "none", {"root": root}) is None
    bare = {**step, "lineage_drift": None}
    assert "no lineage root" in decide(bare, 0.99, 0.003, True, lineage_tolerance=0.005)["reason"]
    # a candidate's root is its champion's root, however many promotions lie between
    class Meta:
        lineage, model_version = {"root": root}, "1.3"
    assert lineage_root(tmp_path, Meta()) == root


def test_a_lineage_with_the_former_key_names_is_read_under_todays(release_model_dir):
    """The committed release (warm-started from 1.1 before the weights digest had its own name) says
    ``parent_model_sha256`` and ``root.model_sha256``: a child of it, and a comparison of it, carry
    ``parent_weights_sha256`` and ``root.weights_sha256``, with the same values."""
    from training.lineage import lineage_root, parent_record, read_lineage

    meta = read_meta(release_model_dir)
    old = meta.lineage
    assert set(old) >= {"parent_model_sha256", "root"} and "model_sha256" in old["root"]
    new = read_lineage(old)
    assert new["parent_weights_sha256"] == old["parent_model_sha256"] and "parent_model_sha256" not in new
    assert new["root"] == {"model_version": "1.1", "weights_sha256": old["root"]["model_sha256"],
                           "test_accuracy": old["root"]["test_accuracy"]}
    assert {k: v for k, v in new.items() if k not in ("parent_weights_sha256", "root")} == {
        k: v for k, v in old.items() if k not in ("parent_model_sha256", "root")}
    child = parent_record(release_model_dir, meta)
    assert child == {"parent_weights_sha256": weights_sha256(release_model_dir), "parent_model_version": "1.2",
                     "root": new["root"]}
    assert lineage_root(release_model_dir, meta) == new["root"]
    # lineage.json of an older candidate: its own digest was "model_sha256"
    assert read_lineage({"model_sha256": "b" * 64, "model_version": "1.3"}) == {"weights_sha256": "b" * 64,
                                                                               "model_version": "1.3"}
    assert read_lineage(None) is None and read_lineage(new) == new


@pytest.mark.parametrize("flag", ["--tolerance", "--lineage-tolerance"])
def test_compare_refuses_a_tolerance_outside_zero_to_one(flag, capsys):
    code = cmp.main(["--champion", "models/release", "--challenger", "models/release", flag, "-0.1"])
    assert code == 2 and f"{flag} -0.1: must be in [0, 1)" in capsys.readouterr().err


def test_compare_refuses_a_folder_that_is_no_model_or_a_version_that_exists(release_model_dir, tmp_path, capsys):
    """Before anything is scored, with exit 2 and what was wrong: a champion that is no model folder, and a
    --promote-to that already holds the challenger's version (versions are immutable)."""
    code = cmp.main(["--champion", str(tmp_path / "nothing"), "--challenger", str(release_model_dir)])
    assert code == 2 and "nothing/model.json: not found" in capsys.readouterr().err
    (tmp_path / "versions" / "1.2").mkdir(parents=True)
    code = cmp.main(["--champion", str(release_model_dir), "--challenger", str(release_model_dir),
                     "--promote-to", str(tmp_path / "versions")])
    assert code == 2 and "version 1.2 is there already" in capsys.readouterr().err
