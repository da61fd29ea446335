"""The release model, archived and served by a real TorchServe, keeps its recorded accuracy."""
import base64
import json

import pytest
import requests
import torch

from training.artifact import load_model
from training.data import Split
from training.train import predict_logits

pytestmark = [pytest.mark.integration, pytest.mark.slow]
# Every 10th test image: 1,000 spread over the whole test set. (The first 1,000 are easier than
# the rest: 95.6% against 93.5% overall for the release model.)
SAMPLE = list(range(0, 10000, 10))


def test_served_accuracy_on_1000_test_images(torchserve, release_model_dir, fmnist_png, fmnist_test):
    images, labels = fmnist_test
    recorded = json.loads((release_model_dir / "metrics.json").read_text())["accuracy"]
    served_pred = []
    for start in range(0, len(SAMPLE), 100):
        chunk = SAMPLE[start:start + 100]
        body = {"instances": [base64.b64encode(fmnist_png(i)).decode() for i in chunk]}
        r = requests.post(f"{torchserve.inference_url}/predictions/returns-classifier", json=body, timeout=120)
        assert r.status_code == 200
        served_pred += [p["class_id"] for p in r.json()["predictions"]]
    truth = labels[SAMPLE]
    served = float((torch.tensor(served_pred) == truth).float().mean())
    assert abs(served - recorded) <= 0.01, f"served {served:.3f} vs recorded {recorded:.4f}"
    # And exactly what training's own evaluation path predicts for the same images.
    model, meta = load_model(release_model_dir)
    logits, _ = predict_logits(model, Split(images[SAMPLE].unsqueeze(1), truth), meta.preprocess, torch.device("cpu"))
    assert logits.argmax(1).tolist() == served_pred
