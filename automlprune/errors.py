"""Errors a user can cause and fix.

Every one carries a single sentence saying what is wrong and what to do; the CLI
prints it and exits with code 2, without a traceback.
"""

from __future__ import annotations


class AutomlpruneError(Exception):
    """Base class for errors caused by user input (config, data, checkpoint, model)."""


class ConfigError(AutomlpruneError, ValueError):
    """A YAML file, option or name is wrong (unknown key, unknown name, bad value)."""


class DataNotFoundError(AutomlpruneError, FileNotFoundError):
    """Dataset files are missing or unreadable."""


class CheckpointError(AutomlpruneError):
    """A checkpoint is missing, corrupt, or belongs to another architecture or task."""


class CandidateError(AutomlpruneError, ValueError):
    """A candidate names a group or layer the model lacks, or holds an invalid ratio or bit width."""


class UnsupportedLayerError(AutomlpruneError):
    """The model holds a layer type whose cost or pruning automlprune cannot compute."""
