"""The stage graph, read from dvc.yaml through DVC itself (so interpolation and dependencies match `dvc repro`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import networkx as nx

from clipmill.components.common.errors import ClipmillError

# Which stages each flow ends at (their upstream stages come along); () means every stage.
FLOW_TARGETS: dict[str, tuple[str, ...]] = {
    "download": ("validate_download",),
    "curate": ("report",),
    "train": ("train",),
    "full": (),
}


@dataclass(frozen=True)
class StageSpec:
    name: str
    cmd: str
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    upstream: tuple[str, ...]


def load_dag(root: str | Path = ".") -> dict[str, StageSpec]:
    """All stages of ``root/dvc.yaml`` in a topological order (upstream first)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    root = Path(root)
    if not (root / "dvc.yaml").exists():
        raise ClipmillError(f"{root / 'dvc.yaml'}: no such file (run from the project root)")
    try:
        with Repo(str(root)) as repo:
            graph = repo.index.graph
            # DVC's edges point from a stage to the stages it depends on.
            order = list(reversed(list(nx.topological_sort(graph))))
            return {
                s.name: StageSpec(
                    name=s.name,
                    cmd=s.cmd if isinstance(s.cmd, str) else " && ".join(s.cmd),
                    deps=tuple(str(d) for d in s.deps),
                    outs=tuple(str(o) for o in s.outs),
                    upstream=tuple(sorted(u.name for u in graph.successors(s))),
                )
                for s in order
            }
    except DvcException as e:
        raise ClipmillError(f"{root / 'dvc.yaml'}: {e}") from None


def select(dag: dict[str, StageSpec], targets: tuple[str, ...] = ()) -> list[str]:
    """The stages needed for ``targets`` (all stages when empty), upstream first."""
    if not targets:
        return list(dag)
    unknown = [t for t in targets if t not in dag]
    if unknown:
        raise ClipmillError(f"dvc.yaml: no stage named {', '.join(map(repr, unknown))} (stages: {', '.join(dag)})")
    needed: set[str] = set()
    todo = list(targets)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(dag[name].upstream)
    return [n for n in dag if n in needed]
