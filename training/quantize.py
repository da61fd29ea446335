"""The int8 CPU path: a statically quantised copy of the exported graph, with a review rule of its own.

    returns-quantize --model-dir models/release      # or: python -m training.quantize

Writes ``model.int8.onnx`` into the model folder and an ``int8`` section into ``model.json``; the
server uses both with ``cpu_backend: onnx-int8`` (handler/core.py, ``ModelMeta.on_int8``). Training
builds the same section as a step of its pipeline (training/pipeline.py calls ``int8_path``), from
the weights and model.json's float sections it holds in memory; the command does it for a folder.
Exit codes (docs/exit-codes.md): 0 written; 2 refused before anything is written (argparse too): not
a model folder, no unfamiliar-photo gate in ``model.json``, its ``train_config.json`` missing or
unreadable, or the training data missing or truncated.

Why a rule of its own: quantisation moves each probability by up to ~0.08 (mean ~5e-4 on the test
split), far more than the 1e-3 within which the float graph matches the eager model. So the float
path's temperature, certified threshold and gate are not reused: everything is fitted again on the
int8 graph's own outputs, on the same splits and by the same code as the float path
(training/rule.py; with a retrain's decided photos too): gate statistics on the training split,
its cutoff, the temperature and the certified threshold on the validation split, figures on the
test split.

One rule on every CPU: the int8 graph runs in ONNX Runtime, here as on the server, and its weights
use 7 of their 8 bits (``reduce_range``). Integer dot products are then exact on every x86-64
kernel: without VNNI, u8 x s8 products are summed in pairs into 16 bits (``vpmaddubsw``), which
saturates with full-range weights (255 x 127 x 2 > 32767) and cannot with 7-bit ones. What follows a
dot product (requantisation, lookup-table sigmoids, elementwise products) is elementwise float
arithmetic, rounded the same way by every kernel. Measured on 256 of the release model's validation
photos: ONNX Runtime's logits on an AVX2-only CPU (Haswell, emulated by QEMU) equal the AVX-512 VNNI
ones bit for bit with 7-bit weights, and differ by up to 3.4 with 8-bit ones
(tests/test_int8_portable.py repeats the check). OpenVINO's kernels differ by CPU family (bf16 where
the CPU has it, other blockings elsewhere: up to 0.1 apart on the same graph), so a rule fitted on
its outputs holds on one family only; the server still runs older folders whose rule names it
(handler/openvino_runner.py). ``model.json`` names the runtime and its version (``int8.runtime``),
and a probe (``int8.probe``) lets a server check at start-up that its CPU gives the recorded answers.

Quantisation (ONNX Runtime's quantiser, QDQ format): weights int8 per output channel in 7-bit range,
activations uint8 with ranges from the min/max over ``CAL_PHOTOS`` seeded training photos (and, for a
model trained against composites, a quarter as many composites of them, which it was trained on too).
Before it, every mean over the spatial axes (the squeeze-excite squeezes and the final pool, exported as ``ReduceMean``) becomes a
``GlobalAveragePool``, the same arithmetic, which ONNX Runtime runs quantised; a ``ReduceMean``
is left in float between a dequantise and a quantise of the whole feature map. The agreement with
the float path's served answers on the test split is recorded beside the rule.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from handler.onnx_runner import OnnxRunner, Runner, onnxruntime_version
from returns_model.artifact import (PROBE_PHOTOS, ArtifactError, ModelParts, load_model, load_weights, make_probe,
                                    network_of)
from returns_model.export import INPUT, export_onnx
from returns_model.fileio import write_bytes
from returns_model.gate import UnfamiliarGate
from returns_model.meta import ModelMeta, PreprocessSpec, read_meta, write_meta
from returns_model.names import INT8_FILE
from returns_model.preprocess import normalize
from returns_model.results import ONNXRUNTIME
from training.composite import composite_count, make_composites
from training.drawn import pool_for
from training.config import TrainConfig
from training.data import DataError, Dataset, load_data
from training.errors import TrainConfigFileError
from training.evaluate import calibrated_and_accepted, drift_reference
from training.rule import RuleSettings, fit_rule
from training.trust import TrustSettings, trust_report, trust_section

log = logging.getLogger("training.quantize")
CAL_PHOTOS = 512  # training photos whose activations set the int8 ranges
THREADS = 2
EXIT_REFUSED = 2  # argparse's code too: not a model folder, no gate, no train_config.json, no data


def pools_as_global_average(graph: bytes) -> bytes:
    """Rewrite each ``ReduceMean`` over axes (2, 3) of a float graph as ``GlobalAveragePool`` (then a
    flatten to ``[N, C]`` where the mean dropped those axes). The outputs do not change (float rounding
    aside); the quantiser can then keep the pools in int8 (``QLinearGlobalAveragePool``)."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load_from_string(graph)
    consts = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}

    def attr(node: Any, name: str, default: Any) -> Any:
        found = [helper.get_attribute_value(a) for a in node.attribute if a.name == name]
        return found[0] if found else default

    nodes = []
    for n in m.graph.node:
        axes = attr(n, "axes", None)
        if axes is None and len(n.input) > 1:  # opset 18 and later: the axes are an input
            axes = consts.get(n.input[1])
        if n.op_type != "ReduceMean" or axes is None or sorted(int(a) for a in axes) != [2, 3]:
            nodes.append(n)
            continue
        if attr(n, "keepdims", 1):
            nodes.append(helper.make_node("GlobalAveragePool", [n.input[0]], [n.output[0]], name=f"{n.name}_gap"))
        else:
            pooled, shape = f"{n.output[0]}_gap", f"{n.name}_flat_shape"
            m.graph.initializer.append(numpy_helper.from_array(np.array([0, -1], dtype=np.int64), shape))
            nodes += [helper.make_node("GlobalAveragePool", [n.input[0]], [pooled], name=f"{n.name}_gap"),
                      helper.make_node("Reshape", [pooled, shape], [n.output[0]], name=f"{n.name}_flat")]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m.SerializeToString()


def quantize_graph(graph: bytes, calibration: np.ndarray) -> bytes:
    """Float ONNX bytes -> QDQ int8 ONNX bytes, activation ranges from ``calibration`` (normalised float32 [N, C, H, W])."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([{INPUT: calibration[i:i + 64]} for i in range(0, len(calibration), 64)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, pre, out = (Path(tmp) / name for name in ("float.onnx", "pre.onnx", "int8.onnx"))
        src.write_bytes(pools_as_global_average(graph))
        quant_pre_process(str(src), str(pre))
        # reduce_range: 7-bit weights, so no CPU's int8 kernels saturate (see the module docstring)
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return out.read_bytes()


def run_graph(runner: Runner, images: torch.Tensor, spec: PreprocessSpec,
              batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images -> (logits, tapped embedding) from one runner (ONNX Runtime or OpenVINO)."""
    parts = [runner(normalize(images[i:i + batch], spec)) for i in range(0, len(images), batch)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _calibrated_and_gated(logits: torch.Tensor, tapped: torch.Tensor, images: torch.Tensor, temperature: float,
                          threshold: float, gate: UnfamiliarGate) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The served rule with this gate: (calibrated probabilities, predicted class, auto-accepted)."""
    return calibrated_and_accepted(logits, temperature, threshold, gate.flag(gate.score(tapped, pixels=images)))


@dataclass(frozen=True)
class CalibrationPhotos:
    """How the quantiser's calibration photos are drawn (see the module docstring): ``CAL_PHOTOS``
    seeded training photos and, for a model trained against composites, composites of them, with drawn
    outliers where the run drew them."""

    seed: int
    composite_weight: float
    composite_share: float
    drawn_share: float

    @classmethod
    def of(cls, cfg: TrainConfig) -> "CalibrationPhotos":
        return cls(cfg.seed, cfg.composite_weight, cfg.composite_share, cfg.drawn_share)

    def draw(self, ds: Dataset, spec: PreprocessSpec, drawn: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
        """uint8 calibration photos, and how they were drawn (``quantization.calibration_photos``).
        ``drawn``: the run's drawn pool where the caller made it with these settings (training/train.py);
        otherwise it is made here (training/drawn.py ``pool_for``)."""
        pick = torch.randperm(len(ds.train), generator=torch.Generator().manual_seed(self.seed))[:CAL_PHOTOS]
        calibration, described = ds.train.images[pick], f"{len(pick)} of the training split, seed {self.seed}"
        n_comp = composite_count(len(pick), self.composite_weight, self.composite_share)
        if not n_comp:
            return calibration, described
        # ranges from garments alone clip what the network does on composites (up to 0.73 of a probability)
        if drawn is None:
            drawn = pool_for(self.drawn_share, self.composite_weight, self.seed, spec, len(ds.train))
        gen = torch.Generator().manual_seed(self.seed)
        calibration = torch.cat([calibration, make_composites(calibration, n_comp, gen, spec.fill, drawn, self.drawn_share)])
        described += (f", and {n_comp} composites of them (training/composite.py)" if drawn is None else
                      f", and {n_comp} composites of them and drawn outliers (training/composite.py, drawn.py)")
        return calibration, described


def _gate_layer(meta: ModelMeta, where: object) -> str:
    """The layer the float rule's gate reads, which the int8 rule's gate reads too."""
    if not meta.unfamiliar:
        raise ArtifactError(f"{where}: model.json has no unfamiliar-photo gate, which the int8 path refits; "
                            "re-report the model first (returns-report)")
    return meta.unfamiliar["layer"]


def int8_section(float_graph: bytes, meta: ModelMeta, ds: Dataset, settings: RuleSettings,
                 photos: CalibrationPhotos, drawn: torch.Tensor | None = None,
                 threads: int = THREADS) -> tuple[bytes, dict[str, Any]]:
    """Quantise ``float_graph`` (the exported float network of the model ``meta`` describes, with its
    float rule) and fit the int8 path's review rule with the float rule's ``settings`` (a retrain's
    lessons included, training/rule.py); nothing is written here. Returns the int8 graph and
    model.json's ``int8`` section, without its trust figures (``int8_path`` adds them)."""
    spec, layer, k = meta.preprocess, _gate_layer(meta, "the model"), meta.arch.num_classes
    calibration, described = photos.draw(ds, spec, drawn)
    graph = quantize_graph(float_graph, normalize(calibration, spec).numpy())
    # the int8 graph runs, and its rule is fitted, in the runtime the server will use for it
    int8, fp = OnnxRunner(graph, threads), OnnxRunner(float_graph, threads)

    rule = fit_rule(lambda images: run_graph(int8, images, spec), ds, layer, k, settings)
    gate, cal, m = rule.gate, rule.cal, rule.metrics
    p8, pred8, acc8 = _calibrated_and_gated(rule.test_logits, rule.test_tap, ds.test.images, cal.temperature,
                                            cal.threshold, gate)
    f_logits, f_tap = run_graph(fp, ds.test.images, spec)
    pf, predf, accf = _calibrated_and_gated(f_logits, f_tap, ds.test.images, meta.temperature, meta.threshold,
                                            UnfamiliarGate.from_dict(meta.unfamiliar))
    cert = cal.certificate
    section = {
        "file": INT8_FILE, "sha256": hashlib.sha256(graph).hexdigest(),
        "runtime": {"name": ONNXRUNTIME, "version": onnxruntime_version()},
        # photos and the logits this runtime gave them: a server checks its CPU reproduces them
        "probe": make_probe(ds.val.images[:PROBE_PHOTOS], int8(normalize(ds.val.images[:PROBE_PHOTOS], spec))[0]),
        "quantization": {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ",
                         "weights": "int8 in 7-bit range (reduce_range), per output channel",
                         "activations": "uint8, min/max ranges",
                         "spatial_means": "GlobalAveragePool, quantised",
                         "calibration_photos": described},
        "calibration": {"temperature": cal.temperature, "threshold": cert.threshold,
                        "target_precision": cert.target_precision, "coverage": cert.coverage,
                        "certificate": cert.to_dict()},
        "unfamiliar": gate.to_dict(),
        # what the submitter's drift check compares a night against, from this path's own answers
        "reference": drift_reference(torch.softmax(rule.val_logits / cal.temperature, 1), ds.class_names,
                                     float(rule.val_flagged.float().mean())),
        "test": {"n": len(ds.test), "accuracy": m["accuracy"], "ece_after_calibration": m["ece_after_calibration"],
                 "auto_accepted": m["test_coverage_at_threshold"], "precision": m["test_precision_at_threshold"],
                 "flagged_unfamiliar": m["test_flagged_unfamiliar"]},
        "agreement_with_float_path": {
            "n": len(ds.test), "same_label": float((pred8 == predf).double().mean()),
            "same_review_decision": float((acc8 == accf).double().mean()),
            "max_abs_probability_difference": float((p8 - pf).abs().max()),
            "mean_abs_probability_difference": float((p8 - pf).abs().mean()),
        },
    }
    log.info("int8: test accuracy %.4f (float %.4f); %.1f%% auto-accepted at %.2f%%; same label %.2f%%, "
             "same review decision %.2f%%", m["accuracy"], float((predf == ds.test.labels).double().mean()),
             100 * section["test"]["auto_accepted"], 100 * (section["test"]["precision"] or 0),
             100 * section["agreement_with_float_path"]["same_label"],
             100 * section["agreement_with_float_path"]["same_review_decision"])
    return graph, section


def int8_path(parts: ModelParts, ds: Dataset, settings: RuleSettings, photos: CalibrationPhotos,
              trust: TrustSettings, drawn: torch.Tensor | None = None,
              threads: int = THREADS) -> tuple[bytes, dict[str, Any]]:
    """The int8 path of a model held in memory (``parts``: its weights and model.json's float
    sections): the float graph exported (once), quantised and its rule fitted (``int8_section``), then
    the int8 path measured as served (handler.core.Classifier with ``cpu_backend="onnx-int8"``, on the
    parts with this section and graph) on every unfamiliar kind. Returns the int8 graph and
    model.json's ``int8`` section with its ``trust`` figures; nothing is written here."""
    meta, spec = parts.meta, parts.meta.preprocess
    float_graph = export_onnx(network_of(meta.arch, parts.weights), _gate_layer(meta, "the model"), spec.channels,
                              spec.size)
    graph, section = int8_section(float_graph, meta, ds, settings, photos, drawn, threads)
    served = ModelParts(replace(meta, int8=section), parts.weights, int8_graph=graph, float_graph=float_graph)
    report = trust_report(served, ds.test.images, ds.test.labels, trust, cpu_backend="onnx-int8")
    return graph, {**section, "trust": trust_section(report)}


def add_int8_path(model_dir: Path, ds: Dataset, cfg: TrainConfig) -> dict[str, Any]:
    """Add the int8 path to a model folder: ``model.int8.onnx``, then ``model.json`` with its ``int8``
    section (written once, after the graph it names). Returns the section."""
    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    _gate_layer(meta, model_dir)  # before any work: an older folder without a gate says so (main: exit 2)
    graph, section = int8_path(ModelParts(meta, load_weights(model_dir)), ds, RuleSettings.of(cfg),
                               CalibrationPhotos.of(cfg), TrustSettings.of(cfg))
    write_bytes(model_dir / INT8_FILE, graph)
    write_meta(replace(meta, int8=section), model_dir)
    return section


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="returns-quantize",
                                description="Add the int8 CPU path (graph + its own review rule) to a model folder.")
    p.add_argument("--model-dir", default="models/release", help="a model folder with model.pt, model.json, train_config.json")
    p.add_argument("--data-dir", default=None, help="override the data folder recorded in train_config.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    model_dir = Path(args.model_dir)
    try:
        _, meta = load_model(model_dir)
        _gate_layer(meta, model_dir)
        cfg = TrainConfig.of_folder(model_dir, args.data_dir)
        ds = load_data(cfg, meta.preprocess)
    except (ArtifactError, TrainConfigFileError, DataError) as exc:
        print(f"returns-quantize: {exc}; nothing was written", file=sys.stderr)
        return EXIT_REFUSED
    section = add_int8_path(model_dir, ds, cfg)
    print(f"{model_dir / INT8_FILE}: test accuracy {section['test']['accuracy']:.4f}, "
          f"{100 * section['test']['auto_accepted']:.1f}% auto-accepted at {100 * (section['test']['precision'] or 0):.2f}%; "
          f"unfamiliar kinds routed {', '.join(f'{k} {v:.1%}' for k, v in section['trust']['unfamiliar_kinds_routed'].items())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
