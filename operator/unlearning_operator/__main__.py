"""``python -m unlearning_operator``: the same as the ``unlearning-operator`` command."""

from .main import run

run()
