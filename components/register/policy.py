"""The promotion policy: does a challenger replace the champion? A pure function of two metric sets.

Metrics are flat ``{"zeroshot.acc1": 0.41, ...}`` dicts measured on the same suite version; higher is better
for the primary metric and for every guardrail.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from clipmill.components.common.errors import ClipmillError

from .params import RegisterParams

PROMOTED = "promoted"
REJECTED = "rejected"
# Float noise in stored metrics must not flip a decision that sits exactly on a margin.
_EPS = 1e-9


@dataclass(frozen=True)
class Decision:
    """What the policy decided and the numbers it decided on."""

    outcome: str
    reason: str
    primary_metric: str
    challenger_value: float
    champion_value: float | None
    delta: float | None
    guardrail_deltas: dict[str, float] = field(default_factory=dict)

    @property
    def promote(self) -> bool:
        return self.outcome == PROMOTED

    def to_dict(self) -> dict:
        return asdict(self)


def metric_value(metrics: dict[str, float], name: str, whose: str) -> float:
    """``metrics[name]``; a ClipmillError naming the known metrics when it is missing."""
    if name not in metrics:
        known = ", ".join(sorted(metrics)) or "none"
        raise ClipmillError(f"the {whose}'s metrics have no '{name}' (known: {known})")
    return float(metrics[name])


def decide(challenger: dict[str, float], champion: dict[str, float] | None, policy: RegisterParams) -> Decision:
    """Promote when the primary metric clears the minimum bar and, against a champion, improves by at least
    ``min_improvement`` while no guardrail drops by more than ``guardrail_tolerance``."""
    primary = policy.primary_metric
    value = metric_value(challenger, primary, "challenger")
    if value + _EPS < policy.min_primary:
        reason = f"{primary} {value:.4f} is below the minimum bar {policy.min_primary:.4f}"
        champ_value = metric_value(champion, primary, "champion") if champion is not None else None
        delta = None if champ_value is None else value - champ_value
        return Decision(REJECTED, reason, primary, value, champ_value, delta)
    if champion is None:
        reason = f"no champion yet; {primary} {value:.4f} clears the minimum bar {policy.min_primary:.4f}"
        return Decision(PROMOTED, reason, primary, value, None, None)

    champ_value = metric_value(champion, primary, "champion")
    delta = value - champ_value
    guardrail_deltas = {g: metric_value(challenger, g, "challenger") - metric_value(champion, g, "champion")
                        for g in policy.guardrails if g != primary}
    broken = {g: d for g, d in guardrail_deltas.items() if d + _EPS < -policy.guardrail_tolerance}
    if delta + _EPS < policy.min_improvement:
        reason = (f"{primary} changes by {delta:+.4f} ({champ_value:.4f} -> {value:.4f}); "
                  f"promotion needs at least +{policy.min_improvement:.4f}")
        outcome = REJECTED
    elif broken:
        worst = ", ".join(f"{g} {d:+.4f}" for g, d in sorted(broken.items()))
        reason = f"guardrail regression beyond -{policy.guardrail_tolerance:.4f}: {worst}"
        outcome = REJECTED
    else:
        reason = (f"{primary} improves by {delta:+.4f} ({champ_value:.4f} -> {value:.4f}) "
                  f"and no guardrail regresses beyond -{policy.guardrail_tolerance:.4f}")
        outcome = PROMOTED
    return Decision(outcome, reason, primary, value, champ_value, delta, guardrail_deltas)
