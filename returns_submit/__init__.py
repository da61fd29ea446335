"""The nightly batch submitter (`returns-submit`): standard library and requests only, no torch."""
