"""README's configuration reference, generated from the params schema: the defaults and descriptions are stated
once, in the pydantic models, and the tables cannot drift from them.

    python -m clipmill.docs params            # rewrite the tables in README.md (also `clipmill docs params`)
    python -m clipmill.docs params --check    # exit 1 when README.md is stale
"""
from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from clipmill.components.common.errors import ClipmillError

from .params import DEFAULT_PARAMS, Params, load_params

BEGIN = ("<!-- params-reference:begin (generated from the schema by `clipmill docs params`; "
         "edit the descriptions there) -->")
END = "<!-- params-reference:end -->"
README = "README.md"
REGENERATE = "python -m clipmill.docs params"
_SHORT = 60  # longest default written out in full


def _model_of(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(the model class of a field typed by a model or a list of models, whether it is a list)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation) or (None,)
        if isinstance(item, type) and issubclass(item, BaseModel):
            return item, True
    return None, False


def _code(text: str) -> str:
    """Text safe in a code span inside a table cell."""
    return text.replace("|", "\\|").replace("`", "'").replace("\n", " ")


def _cell(text: str) -> str:
    """Text safe in a Markdown table cell: no column breaks, no '<name>' read as an HTML tag."""
    return text.replace("|", "\\|").replace("<", "\\<").replace("\n", " ")


def format_value(value: Any) -> str:
    """A default as a table cell: YAML-like scalars and short lists in code, long ones counted."""
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list):
        value = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
    if isinstance(value, (list, dict)):
        text = "[" + ", ".join(map(str, value)) + "]" if isinstance(value, list) else text
        if len(text) > _SHORT:
            nouns = ("entry", "entries") if isinstance(value, dict) else ("item", "items")
            return f"{len(value)} {nouns[len(value) != 1]}"
    elif value is None:
        text = "null"
    elif isinstance(value, str) and len(text) > _SHORT:
        return f"`{_code(text[:_SHORT - 20].rstrip())}…`"
    return f"`{_code(text)}`" if text else "`''`"


def _default(model: type[BaseModel], name: str, instance: BaseModel | None) -> Any:
    if instance is not None:
        return getattr(instance, name)
    info = model.model_fields[name]
    if info.default is PydanticUndefined and info.default_factory is None:
        return PydanticUndefined
    return info.get_default(call_default_factory=True)


def _row(name: str, default: Any, demo: Any, description: str) -> str:
    shown = "required" if default is PydanticUndefined else format_value(default)
    if demo is not PydanticUndefined and default is not PydanticUndefined and demo != default:
        shown += f" (demo: {format_value(demo)})"
    return f"| `{name}` | {shown} | {_cell(description)} |"


def _prose(model: type[BaseModel], description: str | None) -> list[str]:
    own_doc = model.__dict__.get("__doc__")
    parts = [p for p in (description, " ".join(own_doc.split()) if own_doc else None) if p]
    return [_cell(" ".join(parts)), ""] if parts else []


class _Writer:
    """Walks the schema: one table per section, nested sections after their parent, each model's keys once."""

    def __init__(self) -> None:
        self.home: dict[type, str] = {}
        self.lines: list[str] = []
        for name, info in Params.model_fields.items():  # a top-level section is the home of its model's table
            self.home.setdefault(info.annotation, name)

    def section(self, path: str, model: type[BaseModel], instance: BaseModel | None, demo: Any,
                description: str | None, is_list: bool = False) -> None:
        level = "#" * min(3 + path.count("."), 5)
        self.lines += [f"{level} `{path}{'[]' if is_list else ''}`", ""]
        home = self.home.get(model)
        if home is not None and home != path:
            self._reference(home, model, instance, demo, description)
            return
        self.lines += _prose(model, description)
        users = [p for p, m in self._uses() if m is model and p != path]
        if users:
            self.lines += [f"Also the schema of {', '.join(f'`{u}`' for u in users)}.", ""]
        self._table(path, model, instance, demo)

    def _uses(self) -> list[tuple[str, type]]:
        """(path, model) of every nested model field, for 'also the schema of'."""
        out: list[tuple[str, type]] = []
        todo: list[tuple[str, type[BaseModel]]] = [("", Params)]
        while todo:
            prefix, model = todo.pop()
            for name, info in model.model_fields.items():
                sub, _ = _model_of(info.annotation)
                if sub is not None:
                    out.append((f"{prefix}{name}", sub))
                    todo.append((f"{prefix}{name}.", sub))
        return out

    def _reference(self, home: str, model: type[BaseModel], instance: BaseModel | None, demo: Any,
                   description: str | None) -> None:
        base, here = model(), instance if instance is not None else model()
        changed = [n for n in model.model_fields if getattr(here, n) != getattr(base, n)]
        text = f"{_cell(description) + ' ' if description else ''}The keys of [`{home}`](#{home})"
        text += ", with other defaults:" if changed else ", with the same defaults."
        self.lines += [text, ""]
        demo_changed = [n for n in model.model_fields if demo is not None and getattr(demo, n) != getattr(here, n)]
        if changed or demo_changed:
            self.lines += ["| key | default | meaning |", "|---|---|---|"]
            for n in sorted(set(changed) | set(demo_changed), key=list(model.model_fields).index):
                value = getattr(demo, n) if demo is not None else PydanticUndefined
                self.lines.append(_row(n, getattr(here, n), value, model.model_fields[n].description or ""))
            self.lines.append("")

    def _table(self, path: str, model: type[BaseModel], instance: BaseModel | None, demo: Any) -> None:
        nested: list[tuple[str, type[BaseModel], bool]] = []
        rows = ["| key | default | meaning |", "|---|---|---|"]
        for name, info in model.model_fields.items():
            sub, is_list = _model_of(info.annotation)
            if sub is not None:
                nested.append((name, sub, is_list))
                if not is_list:
                    continue
            default = _default(model, name, instance)
            value = getattr(demo, name) if demo is not None else PydanticUndefined
            rows.append(_row(name, default, value, info.description or ""))
        if len(rows) > 2:
            self.lines += rows + [""]
        for name, sub, is_list in nested:
            info = model.model_fields[name]
            child = None if is_list else _default(model, name, instance)
            child_demo = None if is_list or demo is None else getattr(demo, name)
            self.section(f"{path}.{name}", sub, child, child_demo, info.description, is_list)


def render(demo: Params | None = None) -> str:
    """The configuration reference (Markdown): a table per section, with the demo's value where it differs."""
    writer = _Writer()
    for name, info in Params.model_fields.items():
        model, _ = _model_of(info.annotation)
        writer.section(name, model, None, getattr(demo, name) if demo is not None else None, info.description)
    return "\n".join(writer.lines).rstrip() + "\n"


def _split(text: str, readme: Path) -> tuple[str, str, str]:
    """(before the markers, between them, after them) of the README's text."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ClipmillError(f"{readme}: expected one '{BEGIN}' line before one '{END}' line")
    head, rest = text.split(BEGIN, 1)
    body, tail = rest.split(END, 1)
    return head, body, tail


def updated_readme(readme: Path, params_file: Path) -> tuple[str, str]:
    """(the README's text now, its text with the generated reference between the markers)."""
    text = readme.read_text()
    head, _, tail = _split(text, readme)
    reference = render(load_params(params_file))
    return text, f"{head}{BEGIN}\n\n{reference}\n{END}{tail}"


def write_params_reference(readme: Path, params_file: Path, check: bool = False) -> bool:
    """Rewrite the reference in ``readme`` (or with ``check`` only compare); True when it was up to date."""
    current, wanted = updated_readme(readme, params_file)
    if current == wanted:
        return True
    if not check:
        readme.write_text(wanted)
    return False


def _run(args: argparse.Namespace, params: Any = None) -> int:
    readme = Path(args.readme)
    fresh = write_params_reference(readme, Path(args.params), check=args.check)
    if args.check and not fresh:
        print(f"{readme}: the configuration reference is stale; regenerate it: {REGENERATE}", file=sys.stderr)
        return 1
    print(f"{readme}: configuration reference {'up to date' if fresh else 'regenerated'}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    p = what.add_parser("params", help="README's configuration reference, from the params schema")
    p.add_argument("--readme", default=README, help="the file holding the markers (default: %(default)s)")
    p.add_argument("--params", default=DEFAULT_PARAMS, metavar="FILE",
                   help="the demo's params, shown where they differ from a default (default: %(default)s)")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 when the file is stale")


def register(subparsers: Any, add_params_option: Any = None) -> None:
    """``clipmill docs``: generated documentation."""
    p = subparsers.add_parser("docs", help="regenerate generated documentation (README's configuration reference)")
    add_arguments(p)
    p.set_defaults(handler=_run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipmill.docs", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    try:
        return _run(parser.parse_args(argv))
    except ClipmillError as e:
        print(f"clipmill: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
