"""The ``clara`` command line: thin wrappers that turn options into configs and call the library, one module per
command group (``train``, ``model``, ``data``, ``evaluate``, ``store``) over ``common`` (the apps and shared
options). ``clara_flows.cli`` adds the commands that need the tracking server; ``python -m clara.cli`` (what
torchrun launches) runs the library's commands alone."""

from clara.cli import data, evaluate, model, store, train  # noqa: F401  each registers its commands on ``app``
from clara.cli.common import app, check_output, fail, quiet_libraries, run_app, user_error

__all__ = ["app", "check_output", "fail", "quiet_libraries", "run_app", "user_error"]
