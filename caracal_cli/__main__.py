from caracal_cli.cli import app

app(prog_name="caracal")
