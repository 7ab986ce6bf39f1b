"""What ``clipmill models`` does: list, compare, promote and roll back the registered versions."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from clipmill.components.common.errors import ClipmillError
from clipmill.components.common.evaluation import SUITE_FILE, read_suite_version
from clipmill.components.common.tracking import tracking_uri

from .promotion import TAG_OUTCOME, metrics_on_suite, promote_version, rollback
from .registry import TAG_EVAL_PREFIX, TAG_METRIC_PREFIX, TAG_SUITE, all_versions, get_version


def _client(params):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri(params.tracking))


def _name(args, params) -> str:
    return args.name or params.register.model_name


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell, a rule under the header."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _metric(tags: dict[str, str], name: str) -> str:
    raw = tags.get(TAG_METRIC_PREFIX + name)
    return f"{float(raw):.4f}" if raw is not None else "-"


def _warm_start(tags: dict[str, str], name: str) -> str:
    warm = tags.get("clipmill.warm_start", "-")
    prefix = f"models:/{name}/"
    return f"v{warm[len(prefix):]}" if warm.startswith(prefix) else ("scratch" if warm == "none" else warm)


def _url_lists(tags: dict[str, str]) -> str:
    lists = tags.get("clipmill.data.url_lists")
    return "-" if lists in (None, "unknown") else str(len(lists.split(",")))


def list_models(args, params) -> int:
    client, name = _client(params), _name(args, params)
    versions = all_versions(client, name)
    key_metrics = [params.register.primary_metric, *params.register.guardrails]
    header = ["version", "aliases", "created", "from", "lists", "suite", *key_metrics, "promotion"]
    aliases: dict[str, list[str]] = {}
    for alias, version in client.get_registered_model(name).aliases.items():  # search results omit aliases
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for v in versions:
        created = datetime.fromtimestamp(v.creation_timestamp / 1000).strftime("%Y-%m-%d %H:%M")
        rows.append([v.version, ",".join(sorted(aliases.get(str(v.version), []))) or "-", created,
                     _warm_start(v.tags, name), _url_lists(v.tags), v.tags.get(TAG_SUITE, "-"),
                     *(_metric(v.tags, m) for m in key_metrics), v.tags.get(TAG_OUTCOME, "-")])
    print(f"registered model '{name}' ({len(versions)} versions; metrics on the suite each was registered with)")
    print(format_table(header, rows))
    return 0


def promote(args, params) -> int:
    client, name = _client(params), _name(args, params)
    previous = promote_version(client, name, args.version)
    print(f"champion of '{name}': version {args.version} (was {previous or 'none'})")
    return 0


def roll_back(args, params) -> int:
    client, name = _client(params), _name(args, params)
    old, new = rollback(client, name)
    print(f"champion of '{name}': version {new} (rolled back from {old})")
    return 0


def _recorded_suites(tags: dict[str, str]) -> set[str]:
    return {k[len(TAG_EVAL_PREFIX):] for k in tags if k.startswith(TAG_EVAL_PREFIX)}


def compare(args, params) -> int:
    """Both versions on one suite: the current one in --eval-dir (evaluating a version that lacks it), else the
    one suite both were measured on."""
    client, name = _client(params), _name(args, params)
    a, b = get_version(client, name, args.a), get_version(client, name, args.b)
    if (Path(args.eval_dir) / SUITE_FILE).is_file():
        suite = read_suite_version(args.eval_dir)
        batch, device = params.evaluate.batch_size, params.evaluate.device
        ma, mb = (metrics_on_suite(client, v, suite, args.eval_dir, batch, device) for v in (a, b))
    else:
        common = sorted(_recorded_suites(a.tags) & _recorded_suites(b.tags))
        if len(common) != 1:
            raise ClipmillError(f"versions {a.version} and {b.version} share {len(common)} measured suites "
                                f"({', '.join(common) or 'none'}) and {args.eval_dir} has no {SUITE_FILE}: "
                                f"pass --eval-dir with the suite to compare on")
        suite = common[0]
        ma, mb = (json.loads(v.tags[TAG_EVAL_PREFIX + suite]) for v in (a, b))
    rows = [[m, f"{ma[m]:.4f}", f"{mb[m]:.4f}", f"{mb[m] - ma[m]:+.4f}"] for m in sorted(set(ma) & set(mb))]
    print(f"'{name}' version {a.version} vs {b.version} on suite {suite}")
    print(format_table(["metric", f"v{a.version}", f"v{b.version}", "change"], rows))
    return 0
