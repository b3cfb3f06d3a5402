"""The ``affinity`` command: training's and the service's subcommands under one program."""
