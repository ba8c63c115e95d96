from ddpmlab.bench.cli import cli

cli()
