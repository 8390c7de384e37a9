"""Data layer: loading datasets as `ImageSplits` and splitting them over clients.

Importing this package stays light (NumPy only). TensorFlow-based parts are
imported where needed: `tff_dpmed.data.client_data` (TF/TFF datasets) and
`tff_dpmed.data.tfds_source` (TensorFlow Datasets).
"""

from tff_dpmed.data.medmnist import MEDMNIST_NAMES, load_medmnist, resolve_data_dir
from tff_dpmed.data.partition import partition_dirichlet, partition_iid
from tff_dpmed.data.registry import load_dataset
from tff_dpmed.data.types import DatasetInfo, ImageSplits

__all__ = [
    "DatasetInfo",
    "ImageSplits",
    "MEDMNIST_NAMES",
    "load_dataset",
    "load_medmnist",
    "partition_dirichlet",
    "partition_iid",
    "resolve_data_dir",
]
