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
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from lib import report
from lib.core.components import all_components
from lib.data_gen import VB_DESIDERATA, encode_pairs, iter_pair_batches, load_vb_template, vb_triples
from lib.evaluation import accuracy, filter_correct
from lib.mask_intervention import evaluate_mask, train_mask
from lib.patching import sites_at
from lib.models import load_model
from lib.scores import FirstDigit, describe_first_digit_rule, first_digit_classes, logit_diff
from workflows import common, companions

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
    p = common.ArgumentParser(prog="variable_binding.py", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--steps", default=",".join(STEPS), type=lambda v: common.csv_choice(v, STEPS, "--steps"),
                   help=f"comma-separated subset of {','.join(STEPS)} (default: all)")
    p.add_argument("--resume", action="store_true", help="skip the steps an earlier run in --out finished")
    p.add_argument("--sweep", default="0.003,0.01,0.03,0.1,0.3",
                   type=lambda v: _lambdas(v), help="lambdas of the full-desiderata sweep (their Appendix A figure)")
    p.add_argument("--rank-first", type=common.positive(int, "--rank-first"), default=None,
                   help="train the masks only on the K components attribution patching ranks highest on VD")
    p.add_argument("--out", type=Path, default=Path("runs/variable_binding"), help="output directory")
    args = p.parse_args(argv)
    for flag, value in (("--n-train", args.n_train), ("--n-eval", args.n_eval), ("--epochs", args.epochs),
                        ("--batch-size", args.batch_size), ("--lr", args.lr)):
        if value <= 0:
            p.error(f"{flag} must be > 0, got {value}")
    if args.lam < 0:
        p.error(f"--lambda must be >= 0, got {args.lam:g}")
    if args.template not in (None, "default", "authors") and not Path(args.template).is_file():
        p.error(f"--template {args.template}: no such file (or use default / authors)")
    return args


def _lambdas(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sweep takes comma-separated numbers, got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"--sweep lambdas must be >= 0, got {text}")
    return values


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


STEPS = ("original", "dcm", "sweep", "gradients")


def _data(handle, args, template, metric):
    """The held-out columns (not filtered: Table 1's original row is the unpatched model on these) and the
    training / validation triples (+ and - only, answered correctly, disjoint from the held-out originals)."""
    eval_seed = args.seed + EVAL_SEED_OFFSET
    held_out = {d: vb_triples(d, args.n_eval, seed=eval_seed, template=template) for d in COLUMNS}
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
    return held_out, train, val, skipped


def _mask_sites(handle, sites, train, args):
    """The sites DCM trains on: all of them, or with --rank-first K the K that attribution ranks highest on VD."""
    if not args.rank_first or args.rank_first >= len(sites):
        return sites, None
    from lib.attribution import rank_sites

    batches = list(iter_pair_batches(train[VD], handle.tokenizer, args.batch_size))
    ranked = rank_sites(handle, batches, sites=sites, k=args.rank_first, by="abs", metric=logit_diff, progress=False)
    kept = [s for s, _ in ranked]
    return kept, {"kept": [str(s) for s in kept], "of": len(sites),
                  "forward_passes_saved_per_step": len(sites) - len(kept)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started = time.time()
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("resume", "steps")}
    try:
        run = common.Run(args.out, config, args.resume)
    except SystemExit as err:
        print(f"variable_binding.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    handle = load_model(args.model, device_map=args.device_map, dtype=args.dtype, remote=args.remote)
    run.count_traffic([handle])
    out = args.out
    arch = handle.arch
    all_sites = sites_at(all_components(arch), "last")
    log.info("model %s: %d layers x %d heads; %d sites (every head and MLP at the last token)",
             handle.name, arch.n_layers, arch.n_heads, len(all_sites))
    template = load_vb_template(args.template)
    classes = first_digit_classes(handle.tokenizer)   # answers are judged on their first digit (lib.scores)
    metric = FirstDigit(classes, "hit")
    held_out, train, val, skipped = _data(handle, args, template, metric)
    sites, ranked_first = _mask_sites(handle, all_sites, train, args) if not skipped else (all_sites, None)
    results = {"config": config, "steps": args.steps, "model": handle.name,
               "sites": [str(s) for s in sites], "all_sites": len(all_sites), "rank_first": ranked_first,
               "n_eval": {d: len(v) for d, v in held_out.items()},
               "n_train": {d: len(v) for d, v in train.items()}, "n_val": {d: len(v) for d, v in val.items()},
               "paper_table1": PAPER_TABLE1, "template": template.name,
               "answer_rule": describe_first_digit_rule(classes), "no_correct_triples": skipped,
               "table1": {}, "dcm": {}}
    dcm_config = common.dcm_config(args, loss="logit_diff", penalty="l0.5", combine="alternate", prune=args.prune,
                                   answer_rule="first_digit")

    def original():
        return {d: accuracy(handle, [encode_pairs(ts, handle.tokenizer)], metric) for d, ts in held_out.items()}

    def masks():
        rows = {}
        for row, desiderata in MASKS.items():
            if any(d in skipped for d in desiderata):
                continue
            log.info("DCM, %s: trained on %s", ROW_NAMES[row], ", ".join(desiderata))
            result = train_mask(handle, {d: train[d] for d in desiderata}, {d: val[d] for d in desiderata}, sites,
                                dcm_config)
            acc = evaluate_mask(handle, held_out, sites, result.selected_patched, args.batch_size, "first_digit")
            rows[row] = {**result.to_json(), "trained_on": list(desiderata), "heldout_accuracy": acc}
            log.info("%s: patched %s; held-out %s", row, result.selected_patched or "(none)",
                     {COLUMN_NAMES[d]: round(v, 3) for d, v in acc.items()})
        return rows

    def sweep():
        rows = []
        if any(d in skipped for d in MASKS["full"]):
            return rows
        for lam in args.sweep:
            result = train_mask(handle, {d: train[d] for d in MASKS["full"]}, {d: val[d] for d in MASKS["full"]},
                                sites, replace(dcm_config, lam=lam), progress=False)
            acc = evaluate_mask(handle, held_out, sites, result.selected_patched, args.batch_size, "first_digit")
            rows.append({"lambda": lam, "n_selected": len(result.selected_patched),
                         "selected_patched": result.selected_patched, "heldout_accuracy": acc})
            log.info("lambda %g: %d components, held-out %s", lam, len(result.selected_patched),
                     {COLUMN_NAMES[d]: round(v, 3) for d, v in acc.items()})
        return rows

    def gradients():
        batches = list(iter_pair_batches(held_out[VD][: max(32, args.n_eval // 3)], handle.tokenizer,
                                         args.batch_size))
        return {"attribution": {VD: companions.attribution_beside_scan(handle, batches, all_sites)},
                "logit_lens": companions.lens_of_last_position(handle, encode_pairs(held_out[OI][:64],
                                                                                    handle.tokenizer),
                                                               out / "logit_lens.png")}

    if "original" in args.steps or "dcm" in args.steps:
        results["table1"]["original"] = {**run.step("original", original), "n_patched": 0}
        log.info("original model: %s", {COLUMN_NAMES[d]: round(v, 3) for d, v in results["table1"]["original"].items()
                                         if d in COLUMN_NAMES})
    if "dcm" in args.steps:
        results["dcm"] = run.step("dcm", masks)
        for row, r in results["dcm"].items():
            results["table1"][row] = {**r["heldout_accuracy"], "n_patched": len(r["selected_patched"])}
            report.heatmap(out / f"mask_{row}.png", mask_grid(arch, sites, r["selected_mask"]),
                           f"{ROW_NAMES[row]}: binary mask at the last token (0 = patched); last column = MLP",
                           xlabel=f"head (column {arch.n_heads} = MLP)", cmap="magma")
            report.heatmap(out / f"weights_{row}.png", mask_grid(arch, sites, r["weights"]),
                           f"{ROW_NAMES[row]}: continuous DCM weights (0 = patched); last column = MLP",
                           xlabel=f"head (column {arch.n_heads} = MLP)", cmap="magma")
    if "sweep" in args.steps:
        results["sweep"] = run.step("sweep", sweep)
        rows = sorted(results["sweep"], key=lambda r: r["n_selected"])
        if rows:
            sizes = [r["n_selected"] for r in rows]
            report.line_plot(out / "sweep_accuracy.png", sizes,
                             {COLUMN_NAMES[d]: [r["heldout_accuracy"][d] for r in rows] for d in COLUMNS},
                             "Full-desiderata masks of every lambda: held-out accuracy against mask size "
                             "(the (*) columns: transfer to multiplication)", "components patched", "accuracy")
    if "gradients" in args.steps:
        results["gradients"] = run.step("gradients", gradients)
    table = results["table1"]
    if table:
        report.grouped_bars(out / "table1_accuracy.png", [COLUMN_NAMES[d] for d in COLUMNS],
                            {ROW_NAMES[r]: [table[r][d] for d in COLUMNS] for r in table},
                            f"{handle.name}: held-out accuracy per desideratum (Davies et al. Table 1)")
        report.grouped_bars(out / "paper_table1_accuracy.png", [COLUMN_NAMES[d] for d in COLUMNS],
                            {ROW_NAMES[r]: [PAPER_TABLE1[r][d] for d in COLUMNS] for r in PAPER_TABLE1},
                            "Davies et al. Table 1 (LLaMA-13B), for comparison")
    results.update(run.record())
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
              f"config that produced it. Run time {results['seconds']} s"
              + (f" (steps read back from an earlier run: {', '.join(results['skipped_steps'])})"
                 if results.get("skipped_steps") else "") + ".", ""]
    lines += common.requests_lines(results)
    if results.get("rank_first"):
        rf = results["rank_first"]
        lines += [f"--rank-first: the masks were trained on the {len(rf['kept'])} of {rf['of']} components attribution "
                  f"ranks highest on VD ({', '.join(rf['kept'])}): {rf['forward_passes_saved_per_step']} fewer sites "
                  "blended per step.", ""]
    if results.get("sweep"):
        rows = sorted(results["sweep"], key=lambda r: r["lambda"])
        lines += ["## Lambda sweep (full desiderata; their Appendix A)", "",
                  "Mask size against held-out accuracy, the (*) columns being the transfer to multiplication "
                  "(`sweep_accuracy.png`). Paper: about 10 components is the smallest mask that scores well on both.",
                  "", report.markdown_table(["lambda", "components", *COLUMN_NAMES.values()],
                                            [[f"{r['lambda']:g}", r["n_selected"],
                                              *[f"{r['heldout_accuracy'][d]:.0%}" for d in COLUMNS]] for r in rows]),
                  ""]
    if results.get("gradients"):
        gr = results["gradients"]
        lines += ["## Attribution patching beside activation patching (VD, every head and MLP at the last token)", "",
                  *companions.attribution_table(gr["attribution"][VD]), "",
                  "## Logit lens of the last position (OI programs: the model's own answer)", "",
                  *companions.lens_table(gr["logit_lens"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
