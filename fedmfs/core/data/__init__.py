"""Client data: the on-disk format, loaders for public data sets, a synthetic generator, partitioning."""

from fedmfs.core.data.actionsense import load_actionsense_hdf5
from fedmfs.core.data.format import ClientData, Fleet, load_fleet, save_fleet
from fedmfs.core.data.partition import (
    by_subject,
    dirichlet_label_skew,
    drop_modalities,
    stratified_split,
)
from fedmfs.core.data.synthetic import FAMILIES, PRESETS, SyntheticPreset, make_synthetic
from fedmfs.core.data.ucihar import load_uci_har

__all__ = [
    "FAMILIES",
    "PRESETS",
    "ClientData",
    "Fleet",
    "SyntheticPreset",
    "by_subject",
    "dirichlet_label_skew",
    "drop_modalities",
    "load_actionsense_hdf5",
    "load_fleet",
    "load_uci_har",
    "make_synthetic",
    "save_fleet",
    "stratified_split",
]
