"""The `elastilm` command line: one module per group of commands; each parses its arguments and calls the library."""
