"""One module per command that is not a Trainer method (`partition`, `experts`, `pipeline`, `evaluate`, `ablate`,
`route`, `profile`, `export`, `serve`, `edge`), registered in askexpert/cli.py's command table. Each builds its
parser with `askexpert.parsers.command_parser`. Commands use the library (collab, pipeline, runs, ...); nothing
in the library imports a command."""
