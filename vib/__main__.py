"""`python -m vib --plan PLAN`: the tap without the dmover CLI."""

import typer

from vib.command import tap_command

if __name__ == "__main__":
    typer.run(tap_command)
