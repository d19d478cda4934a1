"""circuits-nnsight: causal interventions on language models with nnsight, locally or on NDIF.

The public API, importable from here (each name lives in the module shown; loaded on first use):

    load_model, ModelHandle                      lib.models          any model, built-in ones by name
    Component, Site, Prompt, Triple, PairBatch   lib.types           what is patched, the data, the batch
    encode_pairs, encode_answers, entity_triples, vb_triples   lib.data_gen
    patching_scan, activation_patch, mean_activations          lib.patching
    accuracy, filter_correct                     lib.evaluation
    target_hit, target_prob, target_logit, logit_diff          lib.scores
    DCMConfig, train_mask, evaluate_mask, lambda_sweep          lib.mask_intervention
    cmap_scores, cmap_accuracy                   lib.cmap
    path_patch                                   lib.path_patching
    attribution_scan, edge_attribution, rank_sites   lib.attribution     first-order patching from gradients
    gradient_hints                               lib.gradient_hints
    logit_lens                                   lib.logit_lens
    discover_circuit, prune_circuit, Circuit     lib.circuit_discovery
    knockout_curve                               lib.knockout
    faithfulness, completeness, minimality       lib.metrics

Layers (a module imports only from layers below it): lib.types <- lib.core <- lib.data <- lib.builtin <-
methods (lib.patching, lib.mask_intervention, ...) <- workflows/.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_model": "lib.models", "ModelHandle": "lib.models",
    "Component": "lib.types", "Site": "lib.types", "Prompt": "lib.types", "Triple": "lib.types",
    "PairBatch": "lib.types", "EncodedPrompts": "lib.types",
    "encode_pairs": "lib.data_gen", "encode_answers": "lib.data_gen", "entity_triples": "lib.data_gen",
    "vb_triples": "lib.data_gen",
    "patching_scan": "lib.patching", "activation_patch": "lib.patching", "mean_activations": "lib.patching",
    "accuracy": "lib.evaluation", "filter_correct": "lib.evaluation",
    "target_hit": "lib.scores", "target_prob": "lib.scores", "target_logit": "lib.scores", "logit_diff": "lib.scores",
    "DCMConfig": "lib.mask_intervention", "train_mask": "lib.mask_intervention",
    "evaluate_mask": "lib.mask_intervention", "lambda_sweep": "lib.mask_intervention",
    "cmap_scores": "lib.cmap", "cmap_accuracy": "lib.cmap",
    "path_patch": "lib.path_patching",
    "attribution_scan": "lib.attribution", "edge_attribution": "lib.attribution", "rank_sites": "lib.attribution",
    "gradient_hints": "lib.gradient_hints", "logit_lens": "lib.logit_lens",
    "discover_circuit": "lib.circuit_discovery", "prune_circuit": "lib.circuit_discovery",
    "Circuit": "lib.circuit_discovery", "knockout_curve": "lib.knockout",
    "faithfulness": "lib.metrics", "completeness": "lib.metrics", "minimality": "lib.metrics",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lib' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
