"""The LightningCLI behind `fit`, `validate`, `test` and `predict` (askexpert/cli.py only dispatches to it).

One module per job, in the order a run meets them:
- `parser`: the subcommands, their extra options (callback slots, expert options, linked sizes), one-line errors,
  and `--specialization NAME` mapped to its class path;
- `ckpt_path`: the checkpoint a run reads, checked before Lightning unpickles it;
- `config`: the parsed config rewritten before any class is built (loggers, sweeps, evaluations, experts);
- `trainer`: the callbacks and checkpoint IO every Trainer gets;
- `trainer_options`: the Trainer's hardware and loop options, checked before Lightning builds the Trainer;
- `preflight`: everything checked after the objects are built and before the run writes, and the run lock;
- `report`: the results JSON and headline line after `validate` / `test`;
- `cli`: `AskExpertCLI`, the LightningCLI hooks that call the modules above.
"""
