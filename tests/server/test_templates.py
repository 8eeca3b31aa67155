"""ComfyUI's template browser (Workflow → Browse Templates) shows the pack's UI workflows: 0.3.75
lists `<pack>/workflows/*.json` at /api/workflow_templates and serves each file under
/api/workflow_templates/<pack>/. The API-format copies live in workflows/api/ so they are not listed."""
import json
import os
import urllib.parse

import glmtest_server as gs


def _ui_names():
    return sorted(os.path.basename(p)[:-len(".json")] for p in gs.ui_workflow_paths())


def test_template_list_is_exactly_the_ui_workflows(server):
    listed = server.get_json("/api/workflow_templates")
    assert gs.PACK_NAME in listed, f"the pack has no templates listed: {sorted(listed)}"
    assert sorted(listed[gs.PACK_NAME]) == _ui_names()
    assert not [n for n in listed[gs.PACK_NAME] if n.endswith("_api")]


def test_every_listed_template_can_be_fetched_and_is_the_committed_ui_workflow(server):
    names = server.get_json("/api/workflow_templates")[gs.PACK_NAME]
    assert names
    for name in names:
        path = f"/api/workflow_templates/{urllib.parse.quote(gs.PACK_NAME)}/{urllib.parse.quote(name)}.json"
        status, raw, _ = server.request("GET", path)
        assert status == 200, f"GET {path} -> HTTP {status}"
        served = json.loads(raw)
        assert gs.workflow_to_api.is_ui_workflow(served), f"{name} is not a UI-format workflow"
        assert served == gs.load_json(os.path.join(gs.WORKFLOWS, name + ".json"))
