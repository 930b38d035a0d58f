"""Errors of training runs, each a message for the user."""

from __future__ import annotations


class DataError(ValueError):
    """A training or evaluation data file that cannot be used; the message names the file (and line)."""


class TrainingError(ValueError):
    """Training that cannot go on (a non-finite loss, a device that is not there)."""


class FinetuneRefused(Exception):
    """The output cannot be written as asked (exists without resume, resume with changed settings)."""
