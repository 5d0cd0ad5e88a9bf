"""What the `align` subcommands do beyond calling one library function: reading their input files,
the interactive loop, writing their output. align/cli.py parses the arguments and calls in here;
the library packages (align.generation, align.train, ...) know nothing of either."""
