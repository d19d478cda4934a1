"""The variable-binding workflow (Davies et al. Table 1) end to end on the trained toy:varbind model."""
import json

from workflows import variable_binding

COLUMNS = ["value_dependence", "operation_invariance", "value_dependence_mul", "operation_invariance_add_mul"]


def test_workflow_reproduces_the_shape_of_table1_and_writes_its_outputs(tmp_path, one_thread):
    out = tmp_path / "run"
    variable_binding.main(["--n-train", "96", "--n-eval", "90", "--epochs", "3", "--batch-size", "32",
                           "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "toy:varbind"
    assert len(results["sites"]) == 3 * 4 + 3 and all(s.endswith("@last") for s in results["sites"])
    table = results["table1"]
    assert set(table) == {"original", "incomplete", "full"}
    for row in table.values():
        assert set(row) == {*COLUMNS, "n_patched"}
    assert results["n_eval"] == {d: 90 for d in COLUMNS}

    original, incomplete, full = table["original"], table["incomplete"], table["full"]
    # patching nothing leaves the model's own answer: VD is low, OI is the model's (high) accuracy, on + and -
    # and on the transfer sets (toy:varbind multiplies)
    assert original["n_patched"] == 0
    assert original["value_dependence"] < 0.1 and original["value_dependence_mul"] < 0.1
    assert original["operation_invariance"] > 0.8 and original["operation_invariance_add_mul"] > 0.8
    # both masks patch something and move held-out VD far above the original's
    assert 0 < full["n_patched"] < len(results["sites"]) and incomplete["n_patched"] > 0
    assert full["value_dependence"] > original["value_dependence"] + 0.4
    assert incomplete["value_dependence"] > original["value_dependence"] + 0.4
    # only the full desiderata keep the operation: the VD-only mask breaks OI, the full one keeps most of it
    assert full["operation_invariance"] > 0.7
    assert incomplete["operation_invariance"] < full["operation_invariance"] - 0.3
    # transfer to multiplication, which DCM never trained on (Davies et al.: full mask VD (*) 84%, OI (+,*) 91%;
    # VD-only OI (+,*) 13%): the full mask changes products with the values and keeps them across + <-> *
    assert full["value_dependence_mul"] > original["value_dependence_mul"] + 0.4
    assert full["operation_invariance_add_mul"] > 0.7
    assert incomplete["operation_invariance_add_mul"] < full["operation_invariance_add_mul"] - 0.3
    assert results["dcm"]["full"]["trained_on"] == ["value_dependence", "operation_invariance"]
    assert len(results["dcm"]["full"]["selected_patched"]) == full["n_patched"]
    assert results["config"]["lam"] == "0.03" and results["config"]["prune"] == "False"
    assert all(not d["pruned"] for d in results["dcm"].values())  # the paper keeps the rounded mask

    report = (out / "report.md").read_text()
    assert "toy:varbind" in report and "Full desiderata (VD and OI)" in report and "84%" in report  # paper row
    for name in ["mask_full.png", "mask_incomplete.png", "weights_full.png", "table1_accuracy.png"]:
        assert (out / name).stat().st_size > 1000
