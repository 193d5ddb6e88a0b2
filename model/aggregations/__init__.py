"""Aggregation layers (a backbone's output -> one global descriptor) and their registry: one entry per
--aggregation name.

An entry builds from (model.parts.Features, its options' values) and returns (module, descriptor size). It declares
the backbone layouts it accepts (in order of preference), its own options (argparse flags), whether it is a shallow
pooling that --l2 wraps, what it asks of a transformer backbone, and optional hooks: a check of the flags, an
initialisation from training images, the optimizer's parameter groups, the key layouts of released checkpoints, and
hints that turn a checkpoint's mismatching keys into flag fixes. To add one: a file like rrm.py and one line below.
Module and parameter names follow the original benchmark (and the authors' releases), so that checkpoints load.
"""
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from model.aggregations import boq, convap, mixvpr, netvlad, pools, rrm, salad
from model.parts import CLASS_TOKEN, MAP, MAP_AND_CLASS_TOKEN, SEQPOOL, KeyLayout, Option


@dataclass(frozen=True)
class AggregationEntry:
    build: Callable
    accepts: Tuple[str, ...]
    options: Tuple[Option, ...] = ()
    shallow: bool = False  # a plain pooling, wrapped by --l2 as Sequential(L2Norm?, pool, Flatten)
    final_norm: bool = True  # transformer tokens taken after the backbone's final norm
    rounds_input_to_patch: bool = False  # the model resizes input sides to multiples of the backbone's patch
    check: Optional[Callable] = None  # args -> error message or None
    initialize: Optional[Callable] = None  # (aggregation module, backbone_outputs(images_num)) -> None
    optimizer_groups: Optional[Callable] = None  # (model, options) -> parameter groups with their lr
    starts_from_subset: bool = False  # a checkpoint holding a subset of its layers (CRN from NetVLAD) starts it
    default_fc_output_dim: Optional[int] = None  # --fc_output_dim when not given (a final linear layer of its own)
    key_layouts: Tuple[KeyLayout, ...] = ()
    hints: Optional[Callable] = None  # (missing keys, unexpected keys) -> list of flag fixes


AGGREGATIONS = {
    "netvlad": AggregationEntry(netvlad.build_netvlad, netvlad.ACCEPTS, netvlad.OPTIONS, initialize=netvlad.initialize),
    "gem": AggregationEntry(pools.build_gem, pools.MAP_OR_TOKENS, shallow=True, key_layouts=(pools.COSPLACE_LAYOUT,)),
    "spoc": AggregationEntry(pools.pooling(pools.SPoC), (MAP,), shallow=True),
    "mac": AggregationEntry(pools.pooling(pools.MAC), (MAP,), shallow=True),
    "rmac": AggregationEntry(pools.pooling(pools.RMAC), (MAP,), shallow=True),
    "crn": AggregationEntry(netvlad.build_crn, (MAP,), netvlad.CRN_OPTIONS, check=netvlad.check_crn,
                            initialize=netvlad.initialize, optimizer_groups=netvlad.crn_optimizer_groups,
                            starts_from_subset=True, hints=netvlad.crn_hints),
    "rrm": AggregationEntry(rrm.build, (MAP,)),
    # The backbone pools itself: its first (class) token, or CCT's sequence pooling
    "cls": AggregationEntry(pools.build_identity, (CLASS_TOKEN,)),
    "seqpool": AggregationEntry(pools.build_identity, (SEQPOOL,)),
    "mixvpr": AggregationEntry(mixvpr.build, (MAP,), mixvpr.OPTIONS, key_layouts=mixvpr.KEY_LAYOUTS),
    "convap": AggregationEntry(convap.build, (MAP,), convap.OPTIONS, key_layouts=convap.KEY_LAYOUTS),
    "boq": AggregationEntry(boq.build, (MAP,), boq.OPTIONS, final_norm=False, key_layouts=boq.KEY_LAYOUTS),
    "salad": AggregationEntry(salad.build, (MAP_AND_CLASS_TOKEN,), salad.OPTIONS, key_layouts=salad.KEY_LAYOUTS),
    "megaloc": AggregationEntry(salad.build, (MAP_AND_CLASS_TOKEN,), salad.MEGALOC_OPTIONS,
                                rounds_input_to_patch=True, default_fc_output_dim=salad.MEGALOC_FC_OUTPUT_DIM,
                                key_layouts=salad.MEGALOC_KEY_LAYOUTS),
}


def get_aggregation(name):
    if name not in AGGREGATIONS:
        raise ValueError(f"Unknown aggregation '{name}'; valid names: {', '.join(AGGREGATIONS)}")
    return AGGREGATIONS[name]
