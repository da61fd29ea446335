"""The release model, archived and served by a real TorchServe, keeps its recorded accuracy.

Serving must not change a single prediction: the served classes of 1,000 test images equal those of
training's own evaluation path, and that path reproduces the recorded test accuracy. (Comparing the
1,000-image accuracy with the 10,000-image figure directly is dominated by sampling noise: its
standard error is about 0.75 points, so only a loose bound is asserted on that.)
"""
import base64
import json
import math

import pytest
import requests
import torch

from returns_model.artifact import load_model
from training.data import Split
from training.evaluate import predict_logits

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SAMPLE = list(range(0, 10000, 10))  # every 10th test image: spread over the whole test set


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
    model, meta = load_model(release_model_dir)
    logits, _ = predict_logits(model, Split(images.unsqueeze(1), labels), meta.preprocess, torch.device("cpu"))
    evaluated = logits.argmax(1)
    # 1. Training's evaluation path reproduces the recorded accuracy on the whole test set.
    assert abs(float((evaluated == labels).float().mean()) - recorded) < 1e-4
    # 2. Serving changes no prediction on the 1,000 images.
    assert served_pred == evaluated[SAMPLE].tolist()
    # 3. So the served accuracy differs from the recorded one by sampling noise only.
    served = float((torch.tensor(served_pred) == labels[SAMPLE]).float().mean())
    assert abs(served - recorded) <= 3 * math.sqrt(recorded * (1 - recorded) / len(SAMPLE)) + 0.01
