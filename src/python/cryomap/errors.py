"""Error types. `InputError` is what bad user input raises; the CLI prints it as one line."""


class InputError(ValueError):
    """Bad input data: a missing file, a missing STAR column, a wrong box size, NaN pixels...

    The message names the file, the field and what was expected, in one line.
    """
