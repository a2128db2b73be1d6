class BAIError(Exception):
    """A problem with the user's input or files. The CLI prints it as one line, without a traceback."""
