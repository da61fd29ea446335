"""Training, calibration, evaluation and packaging of the returns classifier."""
