"""Variable binding (Davies et al. 2023): which components carry a variable's value to the answer?

Runs on any supported model (default: the built-in trained toy:varbind, offline, in minutes on a CPU):
  1. the original model (no patching) on held-out Value Dependence (VD) and Operation Invariance (OI) triples,
     on + and - and on the transfer sets (VD on *, OI swapping + and *): their Table 1's first row,
  2. DCM over every head and every MLP at the last token, trained (a) on VD only ("incomplete desiderata") and
     (b) on VD and OI, alternating their steps ("full desiderata"),
  3. each binary mask on the same held-out columns, plus the number of patched components,
and writes results.json, report.md and PNG plots to --out. Accuracy is judged on the answer's first digit.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from lib import report
from lib.core.components import all_components
from lib.data_gen import VB_DESIDERATA, encode_pairs, load_vb_template, vb_triples
from lib.evaluation import accuracy, filter_correct
from lib.mask_intervention import evaluate_mask, train_mask
from lib.patching import sites_at
from lib.scores import FirstDigit, describe_first_digit_rule, first_digit_classes
from workflows import common

log = logging.getLogger("variable_binding")
DEFAULT_MODEL = "toy:varbind"
VD, OI = "value_dependence", "operation_invariance"
COLUMNS = tuple(VB_DESIDERATA)  # VD (+,-), OI (+,-), VD (*), OI (+,*): Table 1's columns
COLUMN_NAMES = {VD: "VD acc (+,-)", OI: "OI acc (+,-)", "value_dependence_mul": "VD acc (*)",
                "operation_invariance_add_mul": "OI acc (+,*)"}
MASKS = {"incomplete": (VD,), "full": (VD, OI)}   # Table 1's rows: trained on VD only / on VD and OI
ROW_NAMES = {"original": "Original model", "incomplete": "Incomplete desiderata (VD only)",
             "full": "Full desiderata (VD and OI)"}
PAPER_TABLE1 = {   # Davies et al. (2023) Table 1, LLaMA-13B, held-out problems (see /work/shared/PAPERS.md)
    "original": {VD: 0.18, OI: 0.91, "value_dependence_mul": 0.11, "operation_invariance_add_mul": 0.93,
                 "n_patched": 0},
    "incomplete": {VD: 0.93, OI: 0.11, "value_dependence_mul": 0.82, "operation_invariance_add_mul": 0.13,
                   "n_patched": 10},
    "full": {VD: 0.84, OI: 0.82, "value_dependence_mul": 0.84, "operation_invariance_add_mul": 0.91,
             "n_patched": 10},
}
EVAL_SEED_OFFSET = 1000  # held-out triples come from seed + 1000, training from seed + 1, validation seed + 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(p, DEFAULT_MODEL, "toy:varbind, ...")
    common.add_template_arg(p, "the programs' wording: 'default' (x=12, y=40, z=73. y-x=), 'authors' "
                               "(x = 12\\ny = 40\\nx + y = , their code) or a file", default="default")
    p.add_argument("--n-train", type=int, default=256,
                   help="DCM training triples per desideratum, before keeping those the model answers correctly")
    p.add_argument("--n-eval", type=int, default=500, help="held-out triples per Table 1 column (paper: held-out set)")
    p.add_argument("--n-val", type=int, default=None,
                   help="validation triples per desideratum for choosing and pruning the mask (default n-train/4)")
    common.add_dcm_args(p, lam=0.03, lam_help="L0.5; paper: 0.03", init="half")
    p.add_argument("--prune", action="store_true",
                   help="after training, un-patch sites the validation accuracy does not need (not in the paper, "
                        "which keeps the rounded mask; judged on VD alone it can drop the answer-carrying MLPs)")
    p.add_argument("--out", type=Path, default=Path("runs/variable_binding"), help="output directory")
    return p.parse_args(argv)


def training_triples(handle, desideratum: str, n: int, seed: int, exclude: set[str], batch_size: int,
                     template=None, metric=None):
    """Triples the model answers correctly (original and alternate; first-digit rule), none of whose originals is
    held out."""
    triples = [t for t in vb_triples(desideratum, n, seed=seed, template=template) if t.original.text not in exclude]
    return filter_correct(handle, triples, batch_size=batch_size, metric=metric)


def mask_grid(arch, sites, weights) -> np.ndarray:
    """layer x (heads + one MLP column) of a per-site value."""
    grid = np.ones((arch.n_layers, arch.n_heads + 1))
    for site, w in zip(sites, weights):
        c = site.component
        grid[c.layer, c.head if c.is_head else arch.n_heads] = w
    return grid


def main(argv=None) -> dict:
    args = parse_args(argv)
    handle, out, started = common.start_run(args)
    arch = handle.arch
    sites = sites_at(all_components(arch), "last")
    log.info("model %s: %d layers x %d heads; %d sites (every head and MLP at the last token)",
             handle.name, arch.n_layers, arch.n_heads, len(sites))

    # 1. held-out columns (not filtered: Table 1's original row is the unpatched model on these same triples)
    template = load_vb_template(args.template)
    classes = first_digit_classes(handle.tokenizer)   # answers are judged on their first digit (lib.scores)
    metric = FirstDigit(classes, "hit")
    eval_seed = args.seed + EVAL_SEED_OFFSET
    held_out = {d: vb_triples(d, args.n_eval, seed=eval_seed, template=template) for d in COLUMNS}
    original = {d: accuracy(handle, [encode_pairs(ts, handle.tokenizer)], metric) for d, ts in held_out.items()}
    log.info("original model: %s", {COLUMN_NAMES[d]: round(v, 3) for d, v in original.items()})

    # training and validation data: + and - only, correct answers, disjoint from the held-out originals
    exclude = {t.original.text for ts in held_out.values() for t in ts}
    n_val = args.n_val or max(args.n_train // 4, args.batch_size)
    train = {d: training_triples(handle, d, args.n_train, args.seed + 1, exclude, args.batch_size, template, metric)
             for d in (VD, OI)}
    exclude |= {t.original.text for ts in train.values() for t in ts}
    val = {d: training_triples(handle, d, n_val, args.seed + 2, exclude, args.batch_size, template, metric)
           for d in (VD, OI)}
    skipped = {d: common.no_correct_triples(d, args.n_train + n_val, len(train[d]) + len(val[d]))
               for d in (VD, OI) if not train[d] or not val[d]}
    for message in skipped.values():
        log.warning(message)

    results = {"config": {k: str(v) for k, v in vars(args).items()}, "model": handle.name,
               "sites": [str(s) for s in sites], "n_eval": {d: len(v) for d, v in held_out.items()},
               "n_train": {d: len(v) for d, v in train.items()}, "n_val": {d: len(v) for d, v in val.items()},
               "paper_table1": PAPER_TABLE1, "template": template.name,
               "answer_rule": describe_first_digit_rule(classes), "no_correct_triples": skipped,
               "table1": {"original": {**original, "n_patched": 0}}, "dcm": {}}

    # 2. + 3. DCM with the incomplete and the full desiderata, each binary mask on every held-out column
    config = common.dcm_config(args, loss="logit_diff", penalty="l0.5", combine="alternate", prune=args.prune,
                               answer_rule="first_digit")
    for row, desiderata in MASKS.items():
        if any(d in skipped for d in desiderata):
            continue
        log.info("DCM, %s: trained on %s", ROW_NAMES[row], ", ".join(desiderata))
        result = train_mask(handle, {d: train[d] for d in desiderata}, {d: val[d] for d in desiderata}, sites, config)
        acc = evaluate_mask(handle, held_out, sites, result.selected_patched, args.batch_size, "first_digit")
        results["table1"][row] = {**acc, "n_patched": len(result.selected_patched)}
        results["dcm"][row] = {**result.to_json(), "trained_on": list(desiderata), "heldout_accuracy": acc}
        report.heatmap(out / f"mask_{row}.png", mask_grid(arch, sites, result.selected_mask),
                       f"{ROW_NAMES[row]}: binary mask at the last token (0 = patched); last column = MLP",
                       xlabel=f"head (column {arch.n_heads} = MLP)", cmap="magma")
        report.heatmap(out / f"weights_{row}.png", mask_grid(arch, sites, result.weights),
                       f"{ROW_NAMES[row]}: continuous DCM weights (0 = patched); last column = MLP",
                       xlabel=f"head (column {arch.n_heads} = MLP)", cmap="magma")
        log.info("%s: patched %s; held-out %s", row, result.selected_patched or "(none)",
                 {COLUMN_NAMES[d]: round(v, 3) for d, v in acc.items()})

    table = results["table1"]
    report.grouped_bars(out / "table1_accuracy.png", [COLUMN_NAMES[d] for d in COLUMNS],
                        {ROW_NAMES[r]: [table[r][d] for d in COLUMNS] for r in table},
                        f"{handle.name}: held-out accuracy per desideratum (Davies et al. Table 1)")
    report.grouped_bars(out / "paper_table1_accuracy.png", [COLUMN_NAMES[d] for d in COLUMNS],
                        {ROW_NAMES[r]: [PAPER_TABLE1[r][d] for d in COLUMNS] for r in PAPER_TABLE1},
                        "Davies et al. Table 1 (LLaMA-13B), for comparison")
    results["seconds"] = round(time.time() - started, 1)
    report.write_json(out / "results.json", results)
    (out / "report.md").write_text(render_report(results))
    log.info("wrote %s (results.json, report.md, plots) in %.0f s", out, results["seconds"])
    return results


def render_report(results: dict) -> str:
    header = ["", *COLUMN_NAMES.values(), "# patched"]

    def rows(table: dict) -> list[list]:
        return [[ROW_NAMES[r], *[f"{table[r][d]:.0%}" for d in COLUMNS], table[r]["n_patched"]]
                for r in ROW_NAMES if r in table]

    def counts(n: dict) -> str:
        return ", ".join(f"{n[d]} {COLUMN_NAMES[d].split(' acc')[0]}" for d in n)

    cfg = results["config"]
    lines = [f"# Variable binding on {results['model']}", "",
             "Davies et al. (2023), Table 1: DCM over every head and every MLP at the last token. VD = value "
             "dependence (patching should change the answer to the alternate's), OI = operation invariance "
             "(patching should leave it); accuracy on the answer's first digit, held-out programs "
             f"({results['n_eval'][VD]} per column, not filtered for correctness). The (*) columns are the "
             "transfer test: multiplication, which DCM never trained on.", "",
             f"Programs in the {results['template']!r} format; answers judged by the {results['answer_rule']}.", "",
             *[f"**No DCM with {d}**: {m}." for d, m in results["no_correct_triples"].items()],
             "## This run", "", report.markdown_table(header, rows(results["table1"])), "",
             "## The paper (LLaMA-13B)", "", report.markdown_table(header, rows(results["paper_table1"])), "",
             "## Masks", ""]
    mask_rows = [[ROW_NAMES[r], ", ".join(d["selected_patched"]) or "(none)", ", ".join(d["pruned"]) or "-"]
                 for r, d in results["dcm"].items()]
    lines += [report.markdown_table(["", "patched components", "pruned after training"], mask_rows), "",
              "Paper: 9 heads and MLP 27 with both desiderata; a cluster of late MLPs with VD alone.", "",
              f"Training: {counts(results['n_train'])} triples the model answers correctly (original and "
              f"alternate), {counts(results['n_val'])} for validation; "
              f"loss logit_diff, L0.5 penalty lambda={cfg['lam']}, lr={cfg['lr']}, {cfg['epochs']} epochs, "
              f"{cfg['parameterization']} weights from init={cfg['init']}, VD and OI steps alternating, "
              f"{'pruned' if cfg['prune'] == 'True' else 'the rounded mask kept as it is (no pruning)'}.", "",
              "Plots: `table1_accuracy.png` (this run), `paper_table1_accuracy.png`, `mask_<row>.png` and "
              "`weights_<row>.png` (layer x head, last column the MLP). Every number is in `results.json` with the "
              f"config that produced it. Run time {results['seconds']} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
