"""README's configuration reference is generated from the params schema and fails this test when stale."""
from __future__ import annotations

import difflib

import pytest
from pydantic import BaseModel

from clipmill.components.common.errors import ClipmillError
from clipmill.docs import (
    BEGIN,
    END,
    REGENERATE,
    format_value,
    main,
    render,
    updated_readme,
)
from clipmill.params import Params, load_params

from .conftest import REPO


def test_readme_reference_matches_the_schema():
    current, wanted = updated_readme(REPO / "README.md", REPO / "params.yaml")
    diff = "\n".join(list(difflib.unified_diff(current.splitlines(), wanted.splitlines(), lineterm="", n=0))[:12])
    assert current == wanted, f"README.md's configuration reference is stale; regenerate it: {REGENERATE}\n{diff}"


def _fields(model: type[BaseModel], prefix: str = ""):
    for name, info in model.model_fields.items():
        yield f"{prefix}{name}", info
        for sub in (info.annotation, *getattr(info.annotation, "__args__", ())):
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                yield from _fields(sub, f"{prefix}{name}.")


def test_every_schema_field_has_a_description():
    missing = [path for path, info in _fields(Params) if not (info.description or "").strip()]
    assert not missing, f"fields without description=: {missing}"


def test_nested_sections_get_their_own_tables_and_demo_values_are_marked():
    text = render(load_params(REPO / "params.yaml"))
    for heading in ("### `download`", "#### `demo_corpus.behaviours`", "#### `download.mirrors[]`",
                    "#### `rewrite.openai`", "#### `score.bootstrap`", "#### `tune.search_space`"):
        assert f"\n{heading}\n" in f"\n{text}", heading
    assert "| `timeout` | `10` (demo: `5`) |" in text
    assert "| `timeout` | `10` |" in render(None)
    assert "| `prefix` | required |" in text


def test_cell_values_are_escaped_and_long_ones_counted():
    assert format_value(["a|b"]) == "`[a\\|b]`"
    assert format_value(None) == "`null`" and format_value(True) == "`true`" and format_value("") == "`''`"
    assert format_value(list(range(40))) == "40 items"
    assert format_value({"k": "v"}) == '`{"k": "v"}`'


def test_check_fails_on_a_stale_readme_and_the_command_rewrites_it(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nprose kept\n\n{BEGIN}\n| old | table |\n{END}\n\n## Development\nkept too\n")
    args = ["params", "--readme", str(readme), "--params", str(REPO / "params.yaml")]
    assert main([*args, "--check"]) == 1
    assert REGENERATE in capsys.readouterr().err
    assert main(args) == 0
    text = readme.read_text()
    assert "| old | table |" not in text and "### `project`" in text
    assert text.startswith("# x\n\nprose kept\n\n") and text.endswith(f"{END}\n\n## Development\nkept too\n")
    assert main([*args, "--check"]) == 0


def test_missing_markers_are_one_clear_error(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    with pytest.raises(ClipmillError, match="README.md: expected one"):
        updated_readme(readme, REPO / "params.yaml")
