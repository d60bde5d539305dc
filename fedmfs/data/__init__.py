"""Client data: the on-disk format, loaders for public data sets, a synthetic generator, partitioning."""

from fedmfs.data.format import ClientData, Fleet, load_fleet, save_fleet

__all__ = ["ClientData", "Fleet", "load_fleet", "save_fleet"]
