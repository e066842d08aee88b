"""`python -m services.applier`: the applier without the dmover CLI."""

import typer

from services.applier.command import applier_command

if __name__ == "__main__":
    typer.run(applier_command)
