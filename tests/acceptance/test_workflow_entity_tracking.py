"""The entity-tracking workflow end to end on the planted model, whose circuit is known."""
import json

from workflows import entity_tracking


def test_workflow_finds_the_planted_heads_and_writes_its_outputs(tmp_path):
    out = tmp_path / "run"
    entity_tracking.main(["--model", "planted:strong", "--n-boxes", "5", "--n-train", "32", "--n-eval", "32",
                          "--desiderata", "object,label", "--positions", "last", "--epochs", "4", "--batch-size", "8", "--sweep", "0.01,100",
                          "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["model_accuracy"] >= 0.99
    scan = results["patching_scan"]
    assert max(scan["object"], key=scan["object"].get) == "L2H3@last"   # the value fetcher
    assert max(scan["label"], key=scan["label"].get) == "L1H2@last"     # the query-label mover
    assert results["dcm"]["object"]["selected_patched"] == ["L2H3@last"]
    assert results["dcm"]["object"]["heldout_accuracy"]["object"] >= 0.95
    assert results["config"]["n_boxes"] == "5"
    sweep = results["lambda_sweep"]["object"]
    assert [r["final_patched"] for r in sweep] == [["L2H3@last"], []]   # a huge lambda patches nothing
    report = (out / "report.md").read_text()
    assert "L2H3@last" in report and "planted:strong" in report
    for name in ["patching_object_last.png", "mask_label_last.png", "dcm_accuracy.png", "lambda_sweep_object.png"]:
        assert (out / name).stat().st_size > 1000
