"""Prompts and desiderata for the two papers' tasks, with the token positions later steps need: the face of
lib/data/ (encoding, entity, variants, desiderata, varbind, triples), so one import gives the whole data API.

    triples = entity_triples("position", 1000, n_boxes=7, seed=0, tokenizer=tok)   # or "object", "label"
    triples = entity_triples("position", 500, variant="no_comma")                  # Table A11, see VARIANTS
    triples = vb_triples("value_dependence", 1000)                                 # see VB_DESIDERATA
    triples = entity_triples("label", 100, template=load_entity_template("fmt.json"))   # your own wording
    triples = vb_triples("value_dependence", 100, template="authors")              # "x = 12\ny = 40\nx + y = "
    triples = entity_triples(Desideratum("mine", my_target, ("last",)), 100)       # a desideratum as data
    train, val, test = split_triples(triples, (0.8, 0.1, 0.1))
    for batch in iter_pair_batches(train, tok, 32): batch.original, batch.alternate, batch.target_ids

A `Prompt` keeps named character spans; `encode_prompts` maps them to token indices under left padding.
Span names every entity prompt has: object_i / label_i (segment i), query_label, prev_query_label (the queried
label's occurrence in the context), correct_object, last; every program: left_value, right_value, left, op,
right, last (plus var_<name> / value_<name>). Keeping only what a model answers correctly needs a model run:
lib.evaluation.filter_correct.
"""
from __future__ import annotations

from lib.data.desiderata import (DESIDERATA, ENTITY_DESIDERATA, Desideratum, as_answer, entity_noise_triples,
                                 entity_targets, entity_triples, entity_word_pools, resolve_desideratum)
from lib.data.encoding import (answer_batches, answer_token_id, answer_token_ids, encode_answers, encode_pairs,
                               encode_prompts, iter_pair_batches, pad_token_id, token_positions, unknown_words)
from lib.data.entity import (DEFAULT_TEMPLATE, FILLER, LABELS, OBJECTS, SEGMENT, check_template_words,
                             entity_tracking_prompt, random_entity_prompt, render_entity_prompt, usable_labels,
                             usable_objects)
from lib.data.templates import (VB_TEMPLATES, EntityTemplate, VarBindTemplate, load_entity_template,
                                load_vb_template, template_to_dict)
from lib.data.noise import NOISE_KINDS, absent_query_noise_triples, path_patching_noise
from lib.data.triples import load_triples, save_triples, split_triples, triple_from_dict, triple_to_dict
from lib.data.variants import A11_VARIANTS, OUR_VARIANTS, VARIANTS, apply_variant
from lib.data.varbind import (DIGITS, OPERATIONS, VB_DESIDERATA, VB_NAMES, operation_invariance_triples,
                              random_value_program, value_dependence_triples, value_program, variable_binding_prompt,
                              vb_transfer_sets, vb_triples)
from lib.types import EncodedPrompts, PairBatch, Prompt, Triple

__all__ = [
    "DESIDERATA", "ENTITY_DESIDERATA", "Desideratum", "as_answer", "entity_noise_triples", "entity_targets",
    "entity_triples", "entity_word_pools", "resolve_desideratum",
    "answer_batches", "answer_token_id", "answer_token_ids", "encode_answers", "encode_pairs", "encode_prompts",
    "iter_pair_batches", "pad_token_id", "token_positions", "unknown_words",
    "DEFAULT_TEMPLATE", "FILLER", "LABELS", "OBJECTS", "SEGMENT", "check_template_words", "entity_tracking_prompt",
    "random_entity_prompt", "render_entity_prompt", "usable_labels", "usable_objects",
    "VB_TEMPLATES", "EntityTemplate", "VarBindTemplate", "load_entity_template", "load_vb_template",
    "template_to_dict",
    "NOISE_KINDS", "absent_query_noise_triples", "path_patching_noise",
    "load_triples", "save_triples", "split_triples", "triple_from_dict", "triple_to_dict",
    "A11_VARIANTS", "OUR_VARIANTS", "VARIANTS", "apply_variant",
    "DIGITS", "OPERATIONS", "VB_DESIDERATA", "VB_NAMES", "operation_invariance_triples", "random_value_program",
    "value_dependence_triples", "value_program", "variable_binding_prompt", "vb_transfer_sets", "vb_triples",
    "EncodedPrompts", "PairBatch", "Prompt", "Triple",
]
