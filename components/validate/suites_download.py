"""Great Expectations suite for the ``download`` boundary: data/download/manifest.parquet."""
from __future__ import annotations

import os

import great_expectations as gx
from great_expectations.expectations.row_conditions import Column

from clipmill.components.common.io import read_parquet

from .params import DownloadBoundaryParams
from .suites_curation import TableCheck

E = gx.expectations

MANIFEST_COLUMNS = ["uid", "key", "shard", "status", "error_message", "error_reason", "width", "height",
                    "original_width", "original_height", "sha256", "caption", "url", "url_list"]
STATUSES = ["success", "failed_to_download", "failed_to_resize", "refused"]


def download_checks(manifest_path: str | os.PathLike, params: DownloadBoundaryParams) -> list[TableCheck]:
    """The manifest: exact column set, unique non-null uids, known statuses, success rate within bounds,
    image sizes within bounds and the image's location and hash present for every success, a reason for every
    failure, text captions."""
    manifest = read_parquet(manifest_path)
    success = Column("status") == "success"
    failure = Column("status") != "success"
    expectations = [
        E.ExpectTableColumnsToMatchSet(column_set=MANIFEST_COLUMNS, exact_match=True),
        E.ExpectTableRowCountToBeBetween(min_value=1),
        E.ExpectColumnValuesToNotBeNull(column="uid"),
        E.ExpectColumnValuesToBeUnique(column="uid"),
        E.ExpectColumnValuesToNotBeNull(column="url_list", description="every URL names the list it came from"),
        E.ExpectColumnValuesToBeInSet(column="status", value_set=STATUSES),
        E.ExpectColumnValuesToBeInSet(column="status", value_set=["success"], mostly=params.min_success_rate,
                                      description=f"success rate at least {params.min_success_rate:g}"),
        E.ExpectColumnValuesToBeBetween(column="width", min_value=params.min_width, max_value=params.max_width,
                                        row_condition=success),
        E.ExpectColumnValuesToBeBetween(column="height", min_value=params.min_height, max_value=params.max_height,
                                        row_condition=success),
        *[E.ExpectColumnValuesToNotBeNull(column=c, row_condition=success)
          for c in ("key", "shard", "width", "height", "sha256")],
        E.ExpectColumnValuesToNotBeNull(column="error_reason", row_condition=failure),
        E.ExpectColumnValuesToNotBeNull(column="caption"),
        E.ExpectColumnValuesToBeOfType(column="caption", type_="str"),
    ]
    if params.max_success_rate < 1:
        expectations.append(E.ExpectColumnValuesToNotBeInSet(
            column="status", value_set=["success"], mostly=1 - params.max_success_rate,
            description=f"success rate at most {params.max_success_rate:g}"))
    return [TableCheck("manifest", manifest, "download.manifest", expectations)]
