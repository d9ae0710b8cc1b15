"""`python -m askexpert` and the installed `askexpert` command."""

import sys

# Commands that need none of the training stack: run without importing it (torch and Lightning take seconds),
# so the accelerator's expert server starts fast and LitServe's spawned workers stay light.
TORCH_FREE_COMMANDS = {"serve": "askexpert.commands.serve"}


def run_torch_free(module: str, argv: list[str]) -> None:
    import importlib

    from askexpert.errors import one_line_for_user

    try:
        importlib.import_module(module).run(argv)
    except KeyboardInterrupt:  # Ctrl+C while the models load: nothing is served yet
        print("askexpert: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        found = one_line_for_user(err)
        if found is None:
            raise
        print(f"askexpert: error: {found[0]}", file=sys.stderr)
        sys.exit(found[1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in TORCH_FREE_COMMANDS:
        run_torch_free(TORCH_FREE_COMMANDS[sys.argv[1]], sys.argv[2:])
        return
    # Imported here, not at module level: LitServe starts its workers with multiprocessing's "spawn", which
    # re-imports this module in every worker, and they need none of the CLI's training stack.
    from askexpert.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
