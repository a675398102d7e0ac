"""Data sets (bundled or from a local folder) and the shifts that split them over clients."""

from .datasets import (
    DATASET_NAMES,
    DataError,
    Dataset,
    RestrictedUnpickler,
    load_dataset,
    read_cifar_batch,
    read_idx,
)
from .shifts import (
    BALANCED_ROTATION,
    PAPER_LABEL_SHIFT,
    PAPER_ROTATION,
    ClientData,
    LabelPermutation,
    LabelShift,
    Partition,
    Rotation,
    allocate_clients,
    rotate,
)

__all__ = [
    "DATASET_NAMES",
    "DataError",
    "Dataset",
    "RestrictedUnpickler",
    "load_dataset",
    "read_cifar_batch",
    "read_idx",
    "BALANCED_ROTATION",
    "PAPER_LABEL_SHIFT",
    "PAPER_ROTATION",
    "ClientData",
    "LabelPermutation",
    "LabelShift",
    "Partition",
    "Rotation",
    "allocate_clients",
    "rotate",
]
