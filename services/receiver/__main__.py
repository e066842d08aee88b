"""``python -m services.receiver --plan PLAN``: the receiver without the dmover CLI."""

import typer

from .command import receiver_command

if __name__ == "__main__":
    typer.run(receiver_command)
