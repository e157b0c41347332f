"""Error types the library raises; the CLI turns them into one stderr line and an exit code."""


class ChoiceError(Exception):
    """Any problem the user can fix; the message says what and how. Exit code 1."""

    exit_code = 1


class DataError(ChoiceError):
    """The input table is unreadable, malformed or inconsistent."""


class FormulaError(ChoiceError):
    """The formula (or nest specification) cannot be parsed or does not fit the data."""


class ModelError(ChoiceError):
    """The model cannot be fitted (for example under --strict with unidentified terms)."""


class ArtifactError(ChoiceError):
    """A saved model directory is missing, damaged, or written by a newer version."""


class OutputError(ChoiceError):
    """An output cannot be written (permissions, a full disk, a file in the way)."""


class UsageError(ChoiceError):
    """Bad command-line usage the library detects (conflicting options). Exit code 2."""

    exit_code = 2
