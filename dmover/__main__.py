from dmover.cli import app

app()
