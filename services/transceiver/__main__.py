"""``python -m services.transceiver --plan PLAN``: the transceiver without the dmover CLI."""

import typer

from .command import transceiver_command

if __name__ == "__main__":
    typer.run(transceiver_command)
