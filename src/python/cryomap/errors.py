"""Error types. `InputError` is what bad user input raises; the CLI prints it as one line."""


class InputError(ValueError):
    """Bad input data: a missing file, a missing STAR column, a wrong box size, NaN pixels...

    The message names the file, the field and what was expected, in one line.
    """


def one_line(text: str) -> str:
    """A message on one line (a file name or a value may hold a newline)."""
    return " ".join(text.split("\n"))
