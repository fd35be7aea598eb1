"""Side tools over the library, never imported by it: the CLI (cli), checks on local
processes (check), the in-process SPMD simulator (simulate) and the local launcher (launch)."""
