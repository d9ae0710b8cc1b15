"""The Trainer subcommands and their one-line help: a module of its own, free of Lightning, so that
`python -m askexpert --help` and the dispatcher answer without importing the training stack."""

LIGHTNING_COMMANDS = {
    "fit": "train a model (generalist, base model or expert) from a config",
    "validate": "evaluate a checkpoint on the validation split",
    "test": "evaluate a checkpoint on the test split",
    "predict": "write a checkpoint's predictions on the test split to CSV",
}
