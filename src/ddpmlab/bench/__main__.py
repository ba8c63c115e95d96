from ddpmlab.bench.run import cli

cli()
