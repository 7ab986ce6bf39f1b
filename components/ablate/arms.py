"""The arms of an ablation: which curation steps' decisions each arm keeps, and which arm it is compared with."""
from __future__ import annotations

from dataclasses import dataclass

from clipmill.components.common.errors import ConfigError

RAW = "raw"
LEAVE_OUT = "-"


@dataclass(frozen=True)
class Arm:
    name: str                 # raw | <step> (cut after it) | -<step> (all but it)
    steps: tuple[str, ...]    # the curation steps whose decisions the arm keeps, in the declared order
    recurate: bool            # the later steps must see what the left-out step dropped: curated again
    baseline: str | None      # the arm its marginal effect is measured against (None: the first arm)

    @property
    def cut(self) -> bool:
        """A cut after a step (neither raw nor "all but X")."""
        return self.name != RAW and not self.name.startswith(LEAVE_OUT)

    @property
    def label(self) -> str:
        if self.name == RAW:
            return "raw download"
        if not self.cut:
            return f"all but {self.name[1:]}"
        return f"+ {self.name}"


def resolve_arms(spec: list[str] | None, steps: list[str]) -> list[Arm]:
    """The arms of ``ablate.arms`` over ``curate.steps`` (null: raw, then a cut after each step).

    A cut arm's baseline is the cut arm before it in the list; an "all but X" arm's baseline is the arm with
    every step (when listed), so each arm's effect is the marginal effect of the steps it adds or removes."""
    names = list(spec) if spec is not None else [RAW, *steps]
    if not names:
        raise ConfigError("ablate.arms: no arms (null means raw plus one per curation step)")
    arms: list[Arm] = []
    previous_cut: str | None = None
    for name in names:
        if name in (a.name for a in arms):
            raise ConfigError(f"ablate.arms: arm {name!r} is listed twice")
        if name == RAW:
            kept, recurate = (), False
        elif name in steps:
            kept, recurate = tuple(steps[:steps.index(name) + 1]), False
        elif name.startswith(LEAVE_OUT) and name[1:] in steps:
            kept = tuple(s for s in steps if s != name[1:])
            recurate = name[1:] != steps[-1]  # leaving out the last step is a cut after the one before it
        else:
            raise ConfigError(f"ablate.arms: unknown arm {name!r} (raw, a step of curate.steps: "
                              f"{', '.join(steps) or 'none'}, or -<step> for every step but that one)")
        if recurate:
            baseline = next((n for n in names if n in steps and steps.index(n) == len(steps) - 1), None)
        else:
            baseline = previous_cut
            previous_cut = name
        arms.append(Arm(name, kept, recurate, baseline))
    return arms
