"""Subcommands of the `hcnr` CLI: argument parsing and side effects only, no algorithms."""
