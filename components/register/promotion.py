"""Moving the ``champion`` alias: the policy's decision, a person's promotion, and rollback.

Every move appends to the champion history (a registered-model tag) and tags the new champion with the one it
replaced, so ``rollback`` can always go back. A policy decision is recorded on the challenger's version
(``clipmill.promotion``: outcome, reason, numbers, the champion it was compared with, suite, policy hash);
re-running the same decision finds that record and changes nothing.

Moving ``champion`` is a compare-and-set: under the registry lock the alias is read again and must still be the
champion the decision was made against; when another registration moved it meanwhile, the policy decides again
against the new champion (``MAX_DECISIONS`` times at most). The history is read and written under the same lock,
so concurrent registrations never lose an entry.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from clipmill.components.common.errors import ClipmillError
from clipmill.components.common.evaluation import EvaluationRecord, evaluate_source, read_suite_version
from clipmill.components.common.hashing import hash_obj
from clipmill.components.common.log import get_logger

from .params import RegisterParams
from .policy import PROMOTED, REJECTED, Decision, decide, metric_value
from .registry import (
    CHAMPION,
    alias_version,
    champion_history,
    get_version,
    record_metrics,
    recorded_metrics,
    registry_lock,
    require_model,
    set_champion_history,
)

log = get_logger("register")

TAG_PROMOTION = "clipmill.promotion"
TAG_OUTCOME = "clipmill.promotion.outcome"
TAG_PREVIOUS = "clipmill.previous_champion"
TAG_ROLLED_BACK = "clipmill.rolled_back"
ALREADY_CHAMPION = "already-champion"
MANUAL = "promoted-manually"
MAX_DECISIONS = 3  # decisions on one challenger while other registrations keep moving the champion
_ANY = object()


class ChampionMoved(ClipmillError):
    """The champion changed between a decision and the move it decided."""

    def __init__(self, name: str, expected: str | None, actual: str | None):
        self.expected, self.actual = expected, actual
        super().__init__(f"the champion of '{name}' moved from version {expected or 'none'} to {actual or 'none'} "
                         f"while this decision was made")


@dataclass(frozen=True)
class PromotionRecord:
    """A decision about one challenger, with what it was decided against."""

    decision: Decision
    challenger_version: str
    champion_version: str | None   # the champion at decision time
    suite_version: str
    policy_hash: str

    def to_json(self) -> str:
        return json.dumps({"decision": self.decision.to_dict(), "challenger_version": self.challenger_version,
                           "champion_version": self.champion_version, "suite_version": self.suite_version,
                           "policy_hash": self.policy_hash}, sort_keys=True)

    @classmethod
    def from_tag(cls, raw: str) -> PromotionRecord:
        data = json.loads(raw)
        return cls(Decision(**data["decision"]), data["challenger_version"], data["champion_version"],
                   data["suite_version"], data["policy_hash"])


def policy_hash(params: RegisterParams) -> str:
    """Hash of the fields that decide (not the registry name, nor whether promotion runs)."""
    return hash_obj(params.model_dump(exclude={"model_name", "promote", "serving"}))[:16]


def move_champion(client: MlflowClient, name: str, version: str, expected: str | None | object = _ANY) -> str | None:
    """Give ``champion`` to ``version``, append it to the history and tag it with its predecessor.

    Under the registry lock; with ``expected`` (a version, or None for "no champion") a ChampionMoved when the
    champion is no longer that one. Returns the previous champion's version (None when there was none).
    """
    version = str(version)
    with registry_lock(client, name):
        holder = alias_version(client, name, CHAMPION)
        previous = str(holder.version) if holder is not None else None
        if expected is not _ANY and previous != expected:
            raise ChampionMoved(name, expected, previous)
        history = champion_history(client, name)
        if previous is not None and (not history or history[-1] != previous):
            history.append(previous)  # the alias was moved outside clipmill: keep it recoverable
        client.set_registered_model_alias(name, CHAMPION, version)
        set_champion_history(client, name, history + [version])
        client.set_model_version_tag(name, version, TAG_PREVIOUS, previous or "none")
        if TAG_ROLLED_BACK in get_version(client, name, version).tags:
            client.delete_model_version_tag(name, version, TAG_ROLLED_BACK)
    log.info("champion of %s: version %s -> %s", name, previous or "none", version)
    return previous


def _still_valid(recorded: PromotionRecord, suite_version: str, phash: str, champion: str | None) -> bool:
    """A recorded decision stands while the suite, the policy and the champion it concerned are unchanged."""
    if recorded.suite_version != suite_version or recorded.policy_hash != phash:
        return False
    if recorded.decision.outcome == PROMOTED:
        return champion == recorded.challenger_version
    return champion == recorded.champion_version


def metrics_on_suite(client: MlflowClient, version: ModelVersion, suite_version: str, eval_dir: str | os.PathLike,
                     batch_size: int = 64, device: str = "cpu") -> dict[str, float]:
    """``version``'s metrics on ``suite_version``: the recorded ones, or a re-evaluation on ``eval_dir``
    (then recorded)."""
    metrics = recorded_metrics(version, suite_version)
    if metrics is not None:
        return metrics
    on_disk = read_suite_version(eval_dir)
    if on_disk != suite_version:
        raise ClipmillError(f"{eval_dir}: suite version {on_disk} is not {suite_version}; re-run "
                            f"`clipmill stage evaluate` so that both models are measured on the same suite")
    log.info("version %s has no metrics on suite %s: evaluating it", version.version, suite_version)
    record = evaluate_source(f"models:/{version.name}/{version.version}", eval_dir, batch_size=batch_size,
                             device=device, tracking_uri=client.tracking_uri)
    record_metrics(client, version, record)
    return record.metrics


def apply_policy(client: MlflowClient, challenger: ModelVersion, record: EvaluationRecord, params: RegisterParams,
                 eval_dir: str | os.PathLike, batch_size: int = 64, device: str = "cpu") -> PromotionRecord:
    """Decide whether ``challenger`` (measured by ``record``) becomes champion, and act on it; decide again when
    the champion moved before the decision could be applied."""
    for _ in range(MAX_DECISIONS):
        try:
            return _decide_and_apply(client, challenger, record, params, eval_dir, batch_size, device)
        except ChampionMoved as moved:
            log.warning("%s: deciding again against version %s", moved, moved.actual or "none")
    raise ClipmillError(f"the champion of '{challenger.name}' kept moving: no decision on version "
                        f"{challenger.version} could be applied after {MAX_DECISIONS} tries; register it again")


def _decide_and_apply(client: MlflowClient, challenger: ModelVersion, record: EvaluationRecord,
                      params: RegisterParams, eval_dir: str | os.PathLike, batch_size: int,
                      device: str) -> PromotionRecord:
    name, version = challenger.name, str(challenger.version)
    value = metric_value(record.metrics, params.primary_metric, "challenger")
    phash = policy_hash(params)
    champion = alias_version(client, name, CHAMPION)
    champion_version = str(champion.version) if champion else None
    raw = challenger.tags.get(TAG_PROMOTION)
    if raw:
        recorded = PromotionRecord.from_tag(raw)
        if _still_valid(recorded, record.suite_version, phash, champion_version):
            log.info("version %s: decision already recorded (%s), nothing to do", version, recorded.decision.outcome)
            return recorded
    if champion_version == version:  # made champion by a person: nothing to decide
        decision = Decision(ALREADY_CHAMPION, f"version {version} is already the champion", params.primary_metric,
                            value, None, None)
        return PromotionRecord(decision, version, version, record.suite_version, phash)

    if challenger.tags.get(TAG_ROLLED_BACK):
        decision = Decision(REJECTED, f"version {version} was rolled back from champion; only "
                            f"`clipmill models promote {version}` puts it back", params.primary_metric,
                            value, None, None)
    else:
        champ = None if champion is None else metrics_on_suite(client, champion, record.suite_version, eval_dir,
                                                              batch_size, device)
        decision = decide(record.metrics, champ, params)
    result = PromotionRecord(decision, version, champion_version, record.suite_version, phash)
    client.set_model_version_tag(name, version, TAG_PROMOTION, result.to_json())
    client.set_model_version_tag(name, version, TAG_OUTCOME, decision.outcome)
    if decision.promote:
        move_champion(client, name, version, expected=champion_version)
    log.info("version %s vs champion %s: %s (%s)", version, champion_version or "none", decision.outcome,
             decision.reason)
    return result


def promote_version(client: MlflowClient, name: str, version: str) -> str | None:
    """A person's promotion of ``version`` (no policy). Returns the previous champion; no change when it already is."""
    version = str(get_version(client, name, version).version)
    current = alias_version(client, name, CHAMPION)
    if current is not None and str(current.version) == version:
        raise ClipmillError(f"version {version} of '{name}' is already the champion")
    previous = move_champion(client, name, version, expected=str(current.version) if current else None)
    client.set_model_version_tag(name, version, TAG_OUTCOME, MANUAL)
    return previous


def rollback(client: MlflowClient, name: str) -> tuple[str, str]:
    """Give ``champion`` back to the previous champion; returns (from_version, to_version).

    The version rolled back from is tagged so that the policy does not promote it again on its own.
    """
    require_model(client, name)
    with registry_lock(client, name):
        holder = alias_version(client, name, CHAMPION)
        if holder is None:
            raise ClipmillError(f"model '{name}' has no champion to roll back")
        current = str(holder.version)
        history = champion_history(client, name)
        if not history or history[-1] != current:
            history.append(current)
        if len(history) < 2:
            raise ClipmillError(f"version {current} is the first champion of '{name}': no previous one to roll "
                                f"back to")
        history.pop()
        target = history[-1]
        client.set_registered_model_alias(name, CHAMPION, target)
        set_champion_history(client, name, history)
        client.set_model_version_tag(name, current, TAG_ROLLED_BACK, "true")
    log.info("rolled back champion of %s: version %s -> %s", name, current, target)
    return current, target


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def promotion_report(name: str, record: PromotionRecord, challenger_metrics: dict[str, float],
                     champion_metrics: dict[str, float] | None, params: RegisterParams) -> str:
    """The decision as markdown: outcome, reason, and every metric of both models on the suite with its rule."""
    d = record.decision
    champ = f"version {record.champion_version}" if record.champion_version else "none"
    lines = [
        f"# Promotion decision: {name} version {record.challenger_version}",
        "",
        f"- outcome: **{d.outcome}**",
        f"- reason: {d.reason}",
        f"- champion at decision time: {champ}",
        f"- evaluation suite: `{record.suite_version}`",
        f"- policy: primary `{params.primary_metric}` must gain >= {params.min_improvement:.4f} and reach >= "
        f"{params.min_primary:.4f}; guardrails may drop <= {params.guardrail_tolerance:.4f} (policy hash "
        f"`{record.policy_hash}`)",
        "",
        f"| metric | role | champion ({champ}) | challenger (version {record.challenger_version}) | change |",
        "|---|---|---|---|---|",
    ]
    for metric in sorted(challenger_metrics, key=lambda m: (m != params.primary_metric, m not in params.guardrails, m)):
        role = "primary" if metric == params.primary_metric else "guardrail" if metric in params.guardrails else ""
        old = champion_metrics.get(metric) if champion_metrics else None
        new = challenger_metrics[metric]
        lines.append(f"| `{metric}` | {role} | {_fmt(old)} | {_fmt(new)} | "
                     f"{_fmt(None if old is None else new - old, signed=True)} |")
    lines += ["", "Rollback: `clipmill models rollback` gives `champion` back to the previous champion.", ""]
    return "\n".join(lines)
