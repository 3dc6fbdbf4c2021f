"""``python -m broker``: the same as the ``inference-broker`` command."""

from broker.cli import main

main()
