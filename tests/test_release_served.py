"""The release model, archived and served by a real TorchServe, keeps its recorded accuracy."""
import base64
import json

import pytest
import requests

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_served_accuracy_on_1000_test_images(torchserve, release_model_dir, fmnist_png, fmnist_test):
    _, labels = fmnist_test
    recorded = json.loads((release_model_dir / "metrics.json").read_text())["accuracy"]
    correct = 0
    for start in range(0, 1000, 100):
        body = {"instances": [base64.b64encode(fmnist_png(i)).decode() for i in range(start, start + 100)]}
        r = requests.post(f"{torchserve.inference_url}/predictions/returns-classifier", json=body, timeout=120)
        assert r.status_code == 200
        correct += sum(p["class_id"] == int(labels[start + k]) for k, p in enumerate(r.json()["predictions"]))
    served = correct / 1000
    assert abs(served - recorded) <= 0.01, f"served {served:.3f} vs recorded {recorded:.4f}"
    # And exactly what training's own evaluation path predicts for the same images.
    from training.artifact import load_model
    from training.data import Split
    from training.train import predict_logits

    model, meta = load_model(release_model_dir)
    images, _ = fmnist_test
    logits, _ = predict_logits(model, Split(images[:1000].unsqueeze(1), labels[:1000]), meta.preprocess,
                               __import__("torch").device("cpu"))
    assert int((logits.argmax(1) == labels[:1000]).sum()) == correct
