"""report.tables of a TransferabilityResult: the table, strict JSON and the CSV columns."""

import csv
import json

import pytest

from transfer_fast import testing, transferability
from transfer_fast.report.tables import format_table, write_result_csv, write_result_json

SHAPES = {k: v for k, v in testing.resnet_shapes(18).items()
          if k.startswith(("conv1.", "bn1.", "layer1.", "fc."))}


def test_table_json_and_csv(tmp_path):
    r, a, b = testing.triple(SHAPES)
    stem = ("conv1.", "bn1.")
    a = {k: b[k] if k.startswith(stem) else v for k, v in a.items()}  # D(A,B) = 0: T is inf
    with pytest.warns(RuntimeWarning, match="T = inf"):
        result = transferability(r, a, b, backend="torch")
    table = format_table(result)
    assert "overall" in table and "(classifier, not in overall)" in table

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    got = json.loads(write_result_json(result, tmp_path / "t.json").read_text(),
                     parse_constant=refuse)
    assert got["groups"] == result.groups and got["values"][0] == "inf"
    with open(write_result_csv(result, tmp_path / "t.csv"), newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["group", "d_random", "d_pretrained", "T", "in_overall"]
    assert [row[0] for row in rows[1:]] == [*result.groups, "overall"]
    assert rows[1][3] == "inf" and float(rows[-1][3]) == result.overall
