"""Serving: a framework-agnostic classification core and a thin TorchServe adapter over it."""
