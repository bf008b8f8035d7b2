"""User-facing errors: one line that says what is wrong and how to fix it.

The CLI prints ``VitqcError`` messages without a traceback and exits non-zero; anything else is a bug.
"""


class VitqcError(Exception):
    """A problem with the user's input (model, data, pipeline, options, paths)."""

    exit_code = 2


class TraceFailure(VitqcError):
    """The model could not be captured to a torch.fx graph."""


class PassCheckFailed(VitqcError):
    """A pass's ``requires`` did not hold before it ran, or its ``ensures`` did not hold after."""
