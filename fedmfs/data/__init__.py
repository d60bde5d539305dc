"""Client data: the on-disk format, loaders for public data sets, a synthetic generator, partitioning."""

from fedmfs.data.actionsense import load_actionsense_hdf5
from fedmfs.data.format import ClientData, Fleet, load_fleet, save_fleet
from fedmfs.data.partition import by_subject, dirichlet_label_skew, drop_modalities, stratified_split
from fedmfs.data.synthetic import PRESETS, SyntheticPreset, make_synthetic
from fedmfs.data.ucihar import load_uci_har

__all__ = [
    "ClientData", "Fleet", "load_fleet", "save_fleet",
    "make_synthetic", "PRESETS", "SyntheticPreset",
    "load_actionsense_hdf5", "load_uci_har",
    "by_subject", "dirichlet_label_skew", "drop_modalities", "stratified_split",
]
