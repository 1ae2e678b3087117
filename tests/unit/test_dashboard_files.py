"""The Grafana dashboards of ops/grafana, checked structurally (Grafana cannot run here): every
panel has a query on the provisioned Prometheus datasource and a unit, every dashboard has the
`project` variable and uses it, and every weft metric a query names is one docs/metrics.md lists."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "ops" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
DATASOURCE = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"][0]
DOCUMENTED = set(re.findall(r"`(weft_[a-z_]+)`", (ROOT / "docs" / "metrics.md").read_text()))


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in board["panels"]:
        out.extend([panel] if panel.get("type") != "row" else panel.get("panels", []))
    return out


def test_there_are_the_four_dashboards_with_distinct_uids() -> None:
    uids = [json.loads(p.read_text())["uid"] for p in DASHBOARDS]
    assert len(DASHBOARDS) == 4 and len(set(uids)) == 4


def test_the_provider_reads_where_compose_mounts_the_dashboards() -> None:
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "weft.yml").read_text())["providers"][0]
    compose = (ROOT / "docker-compose.yml").read_text()
    assert f"./ops/grafana/dashboards:{provider['options']['path']}" in compose


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_panel_queries_the_provisioned_datasource_with_a_unit(path: Path) -> None:
    board = json.loads(path.read_text())
    variables = {v["name"] for v in board["templating"]["list"]}
    assert "project" in variables
    used_project = False
    for panel in panels(board):
        title = f"{path.name}: {panel.get('title')}"
        targets = panel.get("targets") or []
        assert targets and all(t.get("expr", "").strip() for t in targets), f"{title} has no query"
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{title} has no unit"
        for ref in [panel.get("datasource"), *(t.get("datasource") for t in targets)]:
            assert ref and ref["uid"] == DATASOURCE["uid"], f"{title} names another datasource: {ref}"
        for t in targets:
            for var in re.findall(r"\$(\w+)", t["expr"]):
                assert var in variables or var.startswith("__"), f"{title} uses ${var}, which is not defined"
            used_project |= "$project" in t["expr"]
            for name in re.findall(r"\b(weft_[a-z_]+)", t["expr"]):
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                assert base in DOCUMENTED, f"{title} queries {name}, which docs/metrics.md does not list"
    assert used_project, f"{path.name} never filters by $project"
