"""Datasets for e²KD: a registry of families, one item format, k-shot protocols, teacher cache.

    from trainables.data import DataConfig, build_dataset, dataset_info
    ds = build_dataset(DataConfig(name="digits", shots=10), "train", encoding="rgb", train=True)
    ds[0] -> {"image": [3,32,32], "label": int, "index": int}  (+ "group", "boxes" where relevant)

The frozen-teacher cache lives in :mod:`trainables.data.cache` (pyarrow; imported on demand).
"""
from trainables.data import digits as _digits  # noqa: F401  (registers digits, decoy-digits)
from trainables.data import folders as _folders  # noqa: F401  (registers imagefolder, waterbirds, voc)
from trainables.data.base import (DATASETS, DataInfo, DatasetFamily, Record, Source, SplitDataset, build_dataset,
                                  dataset_info, default_config, register_dataset)
from trainables.data.config import DataConfig
from trainables.data.transforms import MAX_BOXES, View, apply_view, box_mask, encode, sample_view

__all__ = ["DATASETS", "DataConfig", "DataInfo", "DatasetFamily", "Record", "Source", "SplitDataset", "View",
           "MAX_BOXES", "apply_view", "box_mask", "build_dataset", "dataset_info", "default_config", "encode",
           "register_dataset", "sample_view"]
