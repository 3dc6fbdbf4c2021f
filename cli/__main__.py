"""``python -m cli``: the same as the ``inference-broker`` command."""

from cli.main import main

main()
