"""The parts a pipeline run is made of; `askexpert/commands/pipeline.py` puts them together on one page.

In the order a run uses them:
- `settings`: what a run is given (the options, the pipeline config's schema, the constants that keep stage
  identities stable) and the one step that settles what the user wrote before anything checks it;
- `stage_arguments`: each training stage's `fit` command line, built from its files and the pipeline's data;
- `resolve`: a `fit` resolved in this process without training (`--print_config`, model and data built once);
- `stages`: the planned stages, each with its kind, resolved config and identity;
- `checks`: everything checked before anything trains; `prepare`: normalise, check and plan, writing nothing;
- `record`: stages.json, what is done; `runner`: each stage skipped, resumed or trained;
- `partitioning`: the experts' partition from the settings (and the generalist's confusion), shared with the
  `partition` command;
- `launcher`: child `fit` processes, a few per GPU (shared with the `experts` command);
- `dry_run`: the plan as a table; `report`: the evaluation's report files and headline;
- `finished_run`: a run read back by the commands that use its models (`evaluate`, `route`, `export`, `profile`).

The `ablate` command runs each of its cells with these same parts, so they are library code, not the command's.
"""
