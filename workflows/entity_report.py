"""report.md of the entity-tracking workflow: each of Prakash et al.'s tables beside this run's, and one sentence
per finding saying whether this run reproduces it and why (the verdicts compare this run's numbers with the
paper's claim; nothing here is an expected number fed back into a measurement)."""
from __future__ import annotations

from lib import report
from workflows import companions
from workflows.common import requests_lines

PAPER_TABLE1 = {  # Prakash et al. Table 1: the Llama-7B circuit evaluated on each model (full, circuit, random, faith.)
    "Llama-7B": (0.66, 0.66, 0.00, 1.00), "Vicuna-7B": (0.67, 0.65, 0.00, 0.97),
    "Goat-7B": (0.82, 0.73, 0.01, 0.89), "FLoat-7B": (0.82, 0.72, 0.01, 0.88),
}
PAPER_GROUPS = {"Value Fetcher": 40, "Position Transmitter": 7, "Position Detector": 20, "Structure Reader": 5}
PAPER_DCM = {  # heads per group (of PAPER_GROUPS) whose DCM mask carries each variable
    "Value Fetcher": {"object": 40, "label": 0, "position": 0},
    "Position Transmitter": {"object": 0, "label": 0, "position": 5},
    "Position Detector": {"object": 0, "label": 0, "position": 14},
    "Structure Reader": {"object": 0, "label": 0, "position": 0},
}
PAPER_CMAP = {"none": 0.66, "donor": 0.82, "whole circuit": 0.82, "Value Fetcher": 0.82,
              "Position Transmitter": 0.78, "Position Detector": 0.62, "Structure Reader": 0.65}  # Goat-7B -> Llama-7B
CARRIES = {"Value Fetcher": "object", "Position Transmitter": "position", "Position Detector": "position",
           "Structure Reader": None}


def _verdict(ok: bool | None) -> str:
    return {True: "**reproduced**", False: "**not reproduced**", None: "**not measured**"}[ok]


def _findings(results: dict) -> list[str]:
    out = []
    ev = results.get("evaluate")
    if ev and "fine_tuned" in ev:
        b, f = ev["base"]["accuracy"], ev["fine_tuned"]["accuracy"]
        out.append(f"Fine-tuning improves entity tracking (paper: Llama-7B 0.66 -> Goat-7B 0.82): "
                   f"{_verdict(f > b + 0.02)}, {ev['base']['model']} {b:.2f} -> {ev['fine_tuned']['model']} {f:.2f}.")
    ec = results.get("evaluate-circuit")
    if ec:
        base = ec["base"]
        ok = base["faithfulness"] >= 0.9 and base["random_circuit"] <= 0.3 * max(base["full_model"], 1e-9)
        out.append(f"The path-patching circuit is faithful on the base and random circuits of its shape are not "
                   f"(paper 1.00 and 0.00): {_verdict(ok)}, faithfulness {base['faithfulness']:.2f}, random "
                   f"circuits {base['random_circuit']:.2f} (model {base['full_model']:.2f}).")
        if "fine_tuned" in ec:
            ft = ec["fine_tuned"]
            out.append(f"The base's circuit explains most of the fine-tune (paper: Goat-7B faithfulness 0.89, below "
                       f"1): {_verdict(ft['faithfulness'] >= 0.8)}, faithfulness {ft['faithfulness']:.2f}"
                       + ("; it is 1.00 here because the fine-tune changed nothing outside the base's circuit."
                          if ft["faithfulness"] >= 0.995 else "."))
        worst = max(base["completeness_per_group"].values(), default=0.0)
        out.append(f"The circuit is complete (removing any group costs the circuit what it costs the model): "
                   f"{_verdict(worst <= 0.1)}, largest |F(Cir\\K) - F(M\\K)| over the groups {worst:.2f}.")
    dcm = results.get("dcm")
    if dcm and dcm.get("groups"):
        for group, variable in CARRIES.items():
            row = dcm["groups"].get(group)
            if row is None:
                out.append(f"{group}: the circuit has no such group here, so its DCM finding is "
                           f"{_verdict(None)}.")
                continue
            counts = {d: len(r["selected"]) for d, r in row["desiderata"].items()}
            accuracy = {d: r["val_accuracy"] for d, r in row["desiderata"].items()}
            n = len(row["sites"])
            if variable is None:
                ok = all(c == 0 or accuracy[d] <= 0.15 for d, c in counts.items())
                claim = "carries none of object, label and position (paper: none of 5)"
            else:
                others = max((a for d, a in accuracy.items() if d != variable), default=0.0)
                # the mask must select heads and reach the variable's target far more often than any other
                ok = counts.get(variable, 0) > 0 and accuracy.get(variable, 0.0) >= max(0.3, 2 * others)
                claim = (f"carries the {variable} (paper: {PAPER_DCM[group][variable]} of {PAPER_GROUPS[group]} "
                         "heads)")
            detail = ", ".join(f"{d} {c}/{n} at accuracy {accuracy[d]:.2f}" for d, c in counts.items())
            out.append(f"DCM: the {group} {claim}: {_verdict(ok)}; {detail}.")
    cm = results.get("cmap")
    if cm:
        acc = cm["accuracy"]
        gain = {g: acc[g] - acc["none"] for g in acc if g not in ("none", "donor", "whole circuit")}
        best = max(gain, key=gain.get) if gain else None
        gap = acc["donor"] - acc["none"]
        ok = best == "Value Fetcher" and gap > 0 and gain[best] >= 0.5 * gap
        out.append(f"CMAP: patching the fine-tune's Value Fetcher heads into the base recovers most of the "
                   f"fine-tune's gain (paper: 0.66 -> 0.82 of 0.82): {_verdict(ok)}; base {acc['none']:.2f}, "
                   f"fine-tune {acc['donor']:.2f}, " + ", ".join(f"{g} {acc[g]:.2f}" for g in gain)
                   + (f", whole circuit {acc['whole circuit']:.2f}." if "whole circuit" in acc else "."))
    ko = results.get("knockout")
    if ko:
        curve = ko["base"]["curves"].get("last->correct_object", {})
        if curve:
            low, full = min(curve.values()), curve[max(curve, key=int)]
            out.append(f"Knockout: blocking the last token's attention to the correct object breaks the task from the "
                       f"value fetchers' layer on: {_verdict(low <= 0.5 * full)}; accuracy per first blocked layer "
                       + ", ".join(f"L{k} {v:.2f}" for k, v in curve.items()) + ".")
    return out


def render_report(results: dict) -> str:
    models = results["models"]
    lines = [f"# Entity tracking: {models['base']}" + (f" and its fine-tune {models['fine_tuned']}"
                                                          if "fine_tuned" in models else ""), "",
             "Prakash et al. (ICLR 2024), *Fine-tuning Enhances Existing Mechanisms*. Paper numbers: Llama-7B and "
             "its fine-tunes; this run's: the models above. Steps run: " + ", ".join(results["steps"])
             + (f" (finished earlier, read back: {', '.join(results['skipped_steps'])})"
                if results.get("skipped_steps") else "") + ".", "", "## Findings", ""]
    if results.get("circuit_empty"):
        lines += [f"- **No circuit**: {results['circuit_empty']}."]
    lines += [f"- {f}" for f in _findings(results)] or ["- (no step that states a finding was run)"]
    ev = results.get("evaluate")
    if ev:
        rows = [[r, ev[r]["model"], ev[r]["accuracy"]] for r in ("base", "fine_tuned") if r in ev]
        lines += ["", "## Accuracy", "", f"{ev['n']} prompts, chance {ev['chance']:.2f}.", "",
                  report.markdown_table(["", "model", "accuracy"], rows)]
    if "circuit" in results:
        c = results["circuit"]["circuit"]
        rows = [[g["name"], g["position"], g["receivers"] or "logits", g["input"], len(g["heads"]),
                 PAPER_GROUPS.get(g["name"], "-"), ", ".join(h["site"].split("@")[0] for h in g["heads"]) or "-"]
                for g in c["groups"]]
        lines += ["", "## Circuit (path patching, the authors' schedule, then their minimality rule)", "",
                  f"Source: {results['circuit']['source']}. The circuit is in `circuit.json` (load it with "
                  "`lib.circuit_discovery.Circuit.load`, or pass it back with `--circuit`).", "",
                  report.markdown_table(["group", "position", "paths into", "through", "heads", "paper (Llama-7B)",
                                         "heads found"], rows)]
    ec = results.get("evaluate-circuit")
    if ec:
        lines += ["", "## Table 1: the circuit on each model", "", "This run:", "",
                  report.markdown_table(["model", "full model", "circuit", "random circuit", "faithfulness"],
                                        [[r, *vals] for r, vals in _table1_rows(ec)]),
                  "", "Paper:", "",
                  report.markdown_table(["model", "full model", "circuit", "random circuit", "faithfulness"],
                                        [[m, *v] for m, v in PAPER_TABLE1.items()]),
                  "", "Completeness |F(Cir\\K) - F(M\\K)| (0 = complete):", "",
                  report.markdown_table(["K", *ec], [[g, *[ec[r]["completeness_per_group"][g] for r in ec]]
                                                     for g in ec["base"]["completeness_per_group"]]
                                        + [[f"random half #{i + 1}", *[ec[r]["completeness_random_K"][i] for r in ec]]
                                           for i in range(len(ec["base"]["completeness_random_K"]))])]
    dcm = results.get("dcm")
    if dcm and dcm.get("groups"):
        rows = []
        for g, row in dcm["groups"].items():
            n = len(row["sites"])
            paper = PAPER_DCM.get(g, {})
            rows.append([g, n, *[f"{len(row['desiderata'][d]['selected'])}/{n} ({row['desiderata'][d]['val_accuracy']:.2f})"
                                 if d in row["desiderata"] else "-" for d in ("object", "label", "position")],
                         ", ".join(f"{d} {paper[d]}/{PAPER_GROUPS[g]}" for d in paper) or "-"])
        lines += ["", "## Table A2: heads per group whose DCM mask carries each variable", "",
                  "Selected heads / group size (validation accuracy of that mask); DCM per group over the group's "
                  f"heads at its position, {dcm['config']['epochs']} epochs, lr {dcm['config']['lr']}, lambda "
                  f"{dcm['config']['lam']}, init {dcm['config']['init']}.", "",
                  report.markdown_table(["group", "heads", "object", "label", "position", "paper"], rows)]
        for d, message in dcm.get("skipped", {}).items():
            lines += ["", f"- {d}: {message}"]
    fn = results.get("functionality")
    if fn and fn.get("models"):
        lines += ["", "## Figure 3: what each group's DCM heads carry (activation patching)", "",
                  "Accuracy (target reached) when the group's DCM-selected heads are patched from the alternate; "
                  "mean +- std over resamples. `figure3_functionality.png`.", ""]
        for role, row in fn["models"].items():
            table = row["accuracy"]
            groups = list(next(iter(table.values())).keys())
            lines += [f"{row['model']}:", "", report.markdown_table(
                ["desideratum", *groups], [[d, *[f"{table[d][g]['mean']:.2f} +- {table[d][g]['std']:.2f}"
                                                 for g in groups]] for d in table]), ""]
    cm = results.get("cmap")
    if cm:
        acc = cm["accuracy"]
        lines += ["", "## Figure 4: cross-model activation patching (fine-tune -> base)", "",
                  report.markdown_table(["patched from the fine-tune", "heads from", "this run", "paper (Goat -> Llama)"],
                                        [[g, cm["source"].get(g, "-"), v, PAPER_CMAP.get(g, "-")]
                                         for g, v in acc.items()]), "", "`figure4_cmap.png`."]
        if "inputs" in cm:
            kinds = "/".join(cm["inputs"]["kinds"])
            lines += ["", f"Through the heads' {kinds} inputs (at each head's position) instead of their outputs:", "",
                      report.markdown_table(["group", "this run"], list(cm["inputs"]["accuracy"].items()))]
    gr = results.get("gradients")
    if gr:
        lines += ["", "## Attribution patching beside activation patching", "",
                  f"Every head at {', '.join(gr['positions'])}; attribution = (v_alt - v_orig) . gradient, from one "
                  "forward and backward; activation patching = one forward pass per head.", ""]
        for d, section in gr["attribution"].items():
            lines += [f"{d}:", "", *companions.attribution_table(section), ""]
        lines += ["## Logit lens of the last position", "", *companions.lens_table(gr["logit_lens"])]
    ko = results.get("knockout")
    if ko:
        lines += ["", "## Attention knockout (Appendix A)", "",
                  "Accuracy with the attention from one position to another blocked in every layer >= L "
                  "(`knockout_<model>.png`).", ""]
        for role, row in ko.items():
            curves = row["curves"]
            layers = list(next(iter(curves.values())))
            lines += [f"{row['model']}:", "", report.markdown_table(
                ["blocked", *[f"L>={k}" for k in layers]], [[n, *c.values()] for n, c in curves.items()]), ""]
    lines += ["", "## Files", "", "`results.json` (every number and the settings), `circuit.json`, "
              "`steps/<step>.json` (what `--resume` reads back), figures: "
              + ", ".join(f"`{p.rsplit('/', 1)[-1]}`" for p in results.get("figures", [])) + ".",
              f"Run time {results['seconds']} s; per step: "
              + ", ".join(f"{k} {v} s" for k, v in results.get("step_seconds", {}).items()) + "."]
    lines += requests_lines(results)
    return "\n".join(lines) + "\n"


def _table1_rows(ec: dict) -> list[tuple[str, list[float]]]:
    return [(ec[r]["model_name"], [ec[r]["full_model"], ec[r]["circuit"], ec[r]["random_circuit"],
                                   ec[r]["faithfulness"]]) for r in ec]
