"""The job graph of one or more planned pipeline runs: one node per distinct stage, edges from its dependencies.

A node is keyed by the stage's name in the store (`<name>-<identity>`, askexpert/ablation/store.py), so the runs
of an ablation that share a stage (same config, same upstream) share one node and wait on one job. Each node
keeps the first run that planned it: its job trains through that run's folder (whose stage folder links into the
store), exactly as the local launcher would. Nodes come in an order where every node follows its upstream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from askexpert.ablation.store import StageStore
from askexpert.pipeline.prepare import PreparedRun
from askexpert.pipeline.stages import Stage


@dataclass
class StageNode:
    key: str  # the stage's name in the store
    stage: Stage
    run: PreparedRun  # the first run that planned it (its job's fit arguments name this run's folder)
    upstream: list[str]  # keys of the nodes it depends on
    runs: list[str] = field(default_factory=list)  # folders of every run that has it

    @property
    def shared(self) -> bool:
        return len(self.runs) > 1


def job_graph(runs: list[PreparedRun], store: StageStore) -> dict[str, StageNode]:
    """Every distinct stage of `runs` as a node, in an order where upstream nodes come first (the runs' own
    stage order is such an order, and the first run to plan a stage fixes its place)."""
    nodes: dict[str, StageNode] = {}
    for prepared in runs:
        keys = {stage.name: store.key(stage) for stage in prepared.stages}
        needs = training_needs(prepared.stages)
        for stage in prepared.stages:
            key = keys[stage.name]
            if key not in nodes:
                nodes[key] = StageNode(key, stage, prepared, [keys[name] for name in needs[stage.name]])
            nodes[key].runs.append(prepared.layout.root)
    return nodes


def training_needs(stages: list[Stage]) -> dict[str, list[str]]:
    """The stages each stage must wait for before it trains. Mostly its `depends_on`; but experts 1.. of a
    strategy depend on expert 0 only through their identity (their config points at expert 0's, `same_as`), so
    they wait for what expert 0 waits for (base and partition) and all experts train side by side."""
    needs: dict[str, list[str]] = {}
    for stage in stages:
        same_as = stage.config.get("same_as") if isinstance(stage.config, dict) else None
        needs[stage.name] = list(needs[same_as]) if same_as in needs else list(stage.depends_on)
    return needs


def dependants(nodes: dict[str, StageNode], key: str) -> list[str]:
    """The nodes that need `key`, directly or further down (they cannot start when it fails)."""
    found: list[str] = []
    for candidate in nodes.values():  # upstream first: one pass sees every chain
        if any(up == key or up in found for up in candidate.upstream):
            found.append(candidate.key)
    return found


def describe_graph(nodes: dict[str, StageNode], store: StageStore) -> str:
    """The job graph as `--dry_run` prints it: one line per stage (done ones too), its dependencies and the runs
    that share it."""
    lines = [f"job graph: {len(nodes)} stages, {sum(not store.is_done(n.stage) for n in nodes.values())} to submit"]
    width = max((len(n.key) for n in nodes.values()), default=0)
    for node in nodes.values():
        state = "done" if store.is_done(node.stage) else "job"
        after = ", ".join(node.upstream) if node.upstream else "-"
        shared = f"; shared by {len(node.runs)} runs" if node.shared else ""
        lines.append(f"  {node.key.ljust(width)}  {state:4}  after: {after}{shared}")
    return "\n".join(lines)
