"""Data layer: dataset folders -> binary tasks -> samples; transforms to and from model resolution."""

from segicl.data.dataset import (
    MAX_PIXELS,
    DataError,
    Sample,
    SegDataset,
    Task,
    find_datasets,
    is_dataset_folder,
    load_dataset,
    open_image,
)
from segicl.data.transforms import image_to_tensor, mask_to_tensor, resize_prob, tensor_to_image

__all__ = [
    "MAX_PIXELS",
    "DataError",
    "Sample",
    "SegDataset",
    "Task",
    "find_datasets",
    "is_dataset_folder",
    "load_dataset",
    "open_image",
    "image_to_tensor",
    "mask_to_tensor",
    "resize_prob",
    "tensor_to_image",
]
