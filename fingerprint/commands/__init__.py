"""The `fingerprint` command line: one module per subcommand, each a typed `main(config)`."""
