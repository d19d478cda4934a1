"""The cheap gradient-based companions both workflows report beside their patching results: attribution patching
next to the activation-patching scan of the same sites (their rank correlation), and the logit lens of the last
position (where each layer and component already says the answer)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lib import report
from lib.attribution import POST_NORM_FAMILIES, attribution_scan, rank_correlation
from lib.core.handle import ModelHandle
from lib.evaluation import scores
from lib.logit_lens import lens_heatmap, logit_lens
from lib.patching import patching_scan
from lib.scores import logit_diff
from lib.types import PairBatch, Site

TIE_FLOOR = 1e-4
"""Patching effects below this share of the largest count as ties (float round-off, ~1e-6 of a logit, would
otherwise rank at random on models where most sites do nothing)."""


def attribution_beside_scan(handle: ModelHandle, batches: Sequence[PairBatch], sites: Sequence[Site]) -> dict:
    """Attribution patching and the exact activation-patching scan of the same sites, both on the logit difference
    (target minus foil) relative to the unpatched run, and their Spearman correlation.

    Returns:
        {"sites", "attribution", "patching", "spearman", "spearman_raw", "forward_passes": {attribution, patching}}.
    """
    batches = list(batches)
    sites = list(sites)
    attribution = attribution_scan(handle, batches, sites, metric=logit_diff, progress=False)
    patched = patching_scan(handle, batches, sites, metric=logit_diff, progress=False)
    baseline = float(scores(handle, batches, logit_diff, progress=False).mean())
    effect = patched - baseline
    n_batches = len(batches)
    return {"sites": [str(s) for s in sites], "attribution": attribution.tolist(), "patching": effect.tolist(),
            "spearman": rank_correlation(attribution, effect, floor=TIE_FLOOR),
            "spearman_raw": rank_correlation(attribution, effect),
            "forward_passes": {"attribution": 3 * n_batches, "patching": (1 + len(sites)) * n_batches},
            "top_attribution": [str(s) for _, s in sorted(zip((-abs(a) for a in attribution.tolist()), sites))[:5]],
            "top_patching": [str(s) for _, s in sorted(zip((-abs(e) for e in effect.tolist()), sites))[:5]]}


def lens_of_last_position(handle: ModelHandle, batch: PairBatch, path: Path) -> dict:
    """The logit lens of the last position (mean target rank per layer and component) and its heatmap."""
    components = handle.arch.model_type not in POST_NORM_FAMILIES   # gemma2: components have no direct logits
    lens = logit_lens(handle, batch, "last", components=components)
    note = None if components else (f"residual stream only: {handle.arch.model_type} normalises each block's "
                                    "outputs before the residual add, so its heads and MLPs have no direct logits")
    lens_heatmap(path, lens, "rank", title=f"{handle.name}: logit lens at the last token, mean rank of the answer")
    grid = lens.mean("rank")
    return {"columns": lens.columns, "mean_rank": grid.tolist(),
            "resid_rank_per_layer": [float(grid[layer][lens.columns.index("resid")]) for layer in range(lens.n_layers)],
            "figure": str(path), "note": note}


def attribution_table(section: dict) -> list[str]:
    """Markdown lines: the correlation and the top sites of both methods."""
    return [f"Spearman (attribution vs activation patching, logit difference, {len(section['sites'])} sites; "
            f"round-off ties below {TIE_FLOOR:g} of the largest): **{section['spearman']:.2f}** (raw "
            f"{section['spearman_raw']:.2f}); forward-pass equivalents: attribution "
            f"{section['forward_passes']['attribution']}, patching {section['forward_passes']['patching']}.", "",
            report.markdown_table(["rank", "attribution", "activation patching"],
                                  [[i + 1, a, p] for i, (a, p) in enumerate(zip(section["top_attribution"],
                                                                                 section["top_patching"]))])]


def lens_table(section: dict) -> list[str]:
    """Markdown lines: the answer's mean rank in the residual stream after each layer."""
    ranks = section["resid_rank_per_layer"]
    figure = f"`{Path(section['figure']).name}`"
    closing = f"{section['note']} ({figure})." if section.get("note") else f"Per component: {figure}."
    return [report.markdown_table(["after layer", *map(str, range(len(ranks)))], [["answer's mean rank", *ranks]]), "",
            closing]
