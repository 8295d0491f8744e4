"""deploy/grafana/volkin.json: a dashboard Grafana can import into any Prometheus data source.

That every series its queries name is exported is proven against real processes:
tests/controller/test_metrics.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "volkin.json"


def load() -> dict[str, Any]:
    dashboard = json.loads(DASHBOARD.read_text())
    assert isinstance(dashboard, dict)
    return dashboard


def test_the_dashboard_asks_for_its_prometheus_data_source_on_import() -> None:
    variables = {v["name"]: v for v in load()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"


def test_every_panel_and_query_uses_the_chosen_data_source() -> None:
    dashboard = load()
    queried = [p for p in dashboard["panels"] if p["type"] != "row"]
    queried += [v for v in dashboard["templating"]["list"] if v["type"] == "query"]
    assert queried
    for panel in queried:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel
        for target in panel.get("targets", []):
            assert target["datasource"] == panel["datasource"] and target["expr"], target


def test_panels_have_unique_ids_and_fit_the_grid() -> None:
    panels = load()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
