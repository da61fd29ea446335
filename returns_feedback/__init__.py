"""Reviewers' decisions back into the model: the decisions format and its validation (`returns-feedback`).

Standard library only, like the submitter: reviewers' tooling and the CronJob image can validate a
decisions file without torch. Retraining (training/retrain.py) reads decisions through this package.
"""
