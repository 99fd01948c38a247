"""The base of the errors whose message is written for the user: a peer that refused or did not answer (the
database, a teacher endpoint, the model registry, the tracking server, DVC). Bad values and files are
``ValueError`` / ``OSError`` as usual. ``clara`` says either on one line (``clara.cli.fail``); anything else is a
bug and keeps its traceback."""


class ClaraError(RuntimeError):
    """An error whose message tells the user what failed and what to do; not a programming error."""
