"""choice: fit discrete-choice models to long-format tables from the command line."""

__version__ = "0.1.0"
