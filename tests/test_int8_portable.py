"""The int8 rule on another CPU family: the server's start-up and answers on an AVX2-only CPU.

QEMU's user-mode emulator runs this venv's Python on an emulated Haswell (AVX2 and FMA, no AVX-512,
no VNNI), so ONNX Runtime and torch pick their AVX2 kernels, the ones a platform team's AVX2 nodes
run. The int8 graph's 7-bit weights make its integer arithmetic exact on both kernel families
(training/quantize.py), so the emulated CPU must reproduce the int8 probe and give the same logits
as this machine, bit for bit; the float rule's probe must hold on torch's AVX2 kernels too.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from handler.onnx_runner import OnnxRunner
from returns_model.meta import read_meta
from returns_model.names import INT8_FILE
from returns_model.preprocess import normalize

pytestmark = [pytest.mark.slow]
QEMU = shutil.which("qemu-x86_64")
CPU_MODEL = "Haswell"  # AVX2 + FMA, no AVX-512: the family the int8 rule used to fail on

ON_THE_EMULATED_CPU = r"""
import json, sys
import numpy as np, torch
from handler.core import Classifier
from handler.onnx_runner import OnnxRunner
from returns_model.names import INT8_FILE
model_dir, photos = sys.argv[1], np.load(sys.argv[2])
out = {"capability": torch.backends.cpu.get_cpu_capability()}
for backend in ("onnx-int8", "eager"):
    clf = Classifier(model_dir, cpu_backend=backend, warmup=False, threads=2)
    out[backend] = {"backend": clf.backend, "rule": clf.rule.name, "runtime": clf.rule.runtime, "fallback": clf.fallback}
runner = OnnxRunner(open(f"{model_dir}/{INT8_FILE}", "rb").read(), 2)
np.save(sys.argv[3], runner(torch.from_numpy(photos))[0].numpy())
print("RESULT " + json.dumps(out))
"""


@pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 is missing (Debian's qemu-user; make setup installs it)")
def test_an_avx2_cpu_serves_the_certified_int8_rule_with_the_same_answers(release_model_dir, fmnist_test, tmp_path):
    photos = normalize(fmnist_test[0][:256].unsqueeze(1), read_meta(release_model_dir).preprocess).numpy()
    np.save(tmp_path / "photos.npy", photos)
    proc = subprocess.run([QEMU, "-cpu", CPU_MODEL, sys.executable, "-c", ON_THE_EMULATED_CPU, str(release_model_dir),
                           str(tmp_path / "photos.npy"), str(tmp_path / "logits.npy")],
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    seen = json.loads(lines[-1][len("RESULT "):])
    assert seen["capability"] == "AVX2"  # the emulated CPU really lacks AVX-512
    assert seen["onnx-int8"] == {"backend": "onnx-int8", "rule": "int8", "runtime": "onnxruntime", "fallback": None}
    assert seen["eager"] == {"backend": "eager", "rule": "float", "runtime": "torch", "fallback": None}
    here = OnnxRunner((release_model_dir / INT8_FILE).read_bytes(), 2)(torch.from_numpy(photos))[0].numpy()
    assert np.array_equal(np.load(tmp_path / "logits.npy"), here)
