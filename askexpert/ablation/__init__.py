"""The ablation runner's parts: the grid (`grid`), the shared stage store (`store`) and the results tables
(`results`). The `ablate` command (`askexpert.commands.ablate`) puts them together."""
