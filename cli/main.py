"""The ``inference-broker`` command line (also ``python -m cli``): every command, registered here."""

from __future__ import annotations

import click

from cli.acl import acl_cmd
from cli.cancel import cancel
from cli.common import EPILOG, Commands
from cli.dead import dead
from cli.demo import demo
from cli.gateway import gateway
from cli.jobs import result, results, submit
from cli.observe import asyncapi_cmd, report_cmd, top_cmd
from cli.serve import config_cmd, health, policy, up, worker
from cli.simulate import simulate


@click.group(cls=Commands, epilog=EPILOG,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="inference-broker")
def main() -> None:
    """Route inference jobs across GPU and accelerator pools over Redis streams.

    \b
    Quick start:
      inference-broker demo            run a mixed workload on an embedded Redis
      inference-broker up              run a local stack until Ctrl-C
      inference-broker submit --prompt "Hello"   send one job to it
    """


for command in (demo, up, policy, worker, health, config_cmd, submit, result, results, cancel, dead, top_cmd,
                report_cmd, asyncapi_cmd, simulate, gateway, acl_cmd):
    main.add_command(command)
