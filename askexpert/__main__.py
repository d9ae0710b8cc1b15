if __name__ == "__main__":
    # Imported here, not at module level: `serve` starts its workers with multiprocessing's "spawn", which
    # re-imports this module in every worker, and they need none of the CLI's training stack.
    from askexpert.cli import main

    main()
