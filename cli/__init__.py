"""The command line and its tools, on top of everything: ``inference-broker`` (``cli.main``), the
commands that start the roles (``cli.roles``), the local stack and embedded Redis, ``top``,
``report``, AsyncAPI generation and the simulator's front end. Nothing below imports this package."""
