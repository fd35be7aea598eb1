from autotp.tools.cli import entry

entry()
