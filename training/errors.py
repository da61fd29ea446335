"""What the training commands refuse, as exceptions; each command's ``main()`` picks the exit code.

Library code raises these and never exits: ``train()``, ``retrain()`` and the report are called by
tests and by each other, and only a command knows what a refusal means to whoever runs it. The
codes each command gives them are its ``EXIT_*`` constants, listed in docs/exit-codes.md:

    SettingError                  returns-train 1; returns-retrain 2
    training.data.DataError       returns-train, returns-report, returns-quantize, returns-retrain,
                                  returns-compare 2
    TrainConfigFileError          returns-report, returns-quantize, returns-retrain, returns-compare 2
"""
from __future__ import annotations

from typing import Iterable


class SettingError(ValueError):
    """Settings a command cannot use: ``problems`` lists every one, each naming the flag, the value
    and what is allowed (``TrainConfig.validate``, ``RetrainConfig.validate``)."""

    def __init__(self, problems: Iterable[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class TrainConfigFileError(ValueError):
    """A model folder's ``train_config.json`` is missing, not JSON, or names settings this code does
    not know."""
