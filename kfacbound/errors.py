"""Errors that reach the user.

Every problem caused by input (an unknown dataset, a corrupt checkpoint, a state_dict that does not
fit its architecture, NaN weights, an unsupported module) raises :class:`KfacboundError`. The CLI
turns it into one line on stderr and exit code 2; library users catch it like any exception.
"""

from __future__ import annotations


class KfacboundError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it."""


class UnsupportedModuleError(KfacboundError):
    """A module type that an analysis cannot handle; the message names its path in the model."""
