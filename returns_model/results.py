"""What one photo's answer holds: its fields, the reasons it goes to review, and the rules that can
give it. Standard library only, so the server, the submitter and the feedback tools import these
names instead of restating them (docs/interfaces.md describes each field).

The decision itself (when a photo is auto-accepted) is made in one place, ``returns_model.rule``.
"""
from __future__ import annotations

# --- the fields of one photo's result object ---------------------------------------------------
LABEL = "label"
CLASS_ID = "class_id"
CONFIDENCE = "confidence"
NEEDS_REVIEW = "needs_review"
REVIEW_REASON = "review_reason"  # a list of REVIEW_REASONS, empty when the photo is auto-accepted
UNFAMILIAR_SCORE = "unfamiliar_score"
TOP_K = "top_k"
MODEL_NAME = "model_name"
MODEL_VERSION = "model_version"
MODEL_SHA256 = "model_sha256"  # the loaded archive's content digest (the manifest's archive_content_sha256)
RULE = "rule"  # which certified rule decided the photo: one of RULES
RUNTIME = "runtime"  # what computed the scores that rule judged: one of RUNTIMES

RESULT_KEYS = (LABEL, CLASS_ID, CONFIDENCE, NEEDS_REVIEW, REVIEW_REASON, UNFAMILIAR_SCORE, TOP_K,
               MODEL_NAME, MODEL_VERSION, MODEL_SHA256, RULE, RUNTIME)

# --- why a photo goes to people -----------------------------------------------------------------
LOW_CONFIDENCE = "low_confidence"  # its calibrated confidence is under the rule's certified threshold
UNFAMILIAR = "unfamiliar"  # the rule's gate finds it unlike the training photos
NIGHT_DRIFT = "night_drift"  # the submitter's: the whole night looked unlike the reference (--on-drift review)
SERVER_REASONS = (LOW_CONFIDENCE, UNFAMILIAR)
REVIEW_REASONS = SERVER_REASONS + (NIGHT_DRIFT,)

# --- the rules a model folder can serve -----------------------------------------------------------
# Each has its own temperature, certified threshold, gate and drift reference in model.json: the float
# network's (top level) and the int8 graph's (the ``int8`` section).
FLOAT = "float"
INT8 = "int8"
RULES = (FLOAT, INT8)

# What computed the scores: torch on the CPU, torch on a GPU with fp16 autocast (or in fp32 where fp16
# does not reproduce the float probe), ONNX Runtime (the float graph or the int8 graph), or OpenVINO
# (the int8 graphs of folders whose rule names it).
EAGER = "torch"
CUDA_FP16 = "torch-cuda-fp16"
CUDA = "torch-cuda"
ONNXRUNTIME = "onnxruntime"
OPENVINO = "openvino"
RUNTIMES = (EAGER, CUDA_FP16, CUDA, ONNXRUNTIME, OPENVINO)
