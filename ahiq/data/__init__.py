"""Full-reference IQA datasets as distributed: labels, reference-disjoint splits, paired crops."""
from ahiq.data.crops import EVAL_CROPS, CropPlan, eval_crop_positions
from ahiq.data.datasets import EvalPairs, TargetScale, TrainPairs, check_images, check_parts
from ahiq.data.images import ImageError, image_size, read_image
from ahiq.data.labels import DatasetError, Pair, Pairs
from ahiq.data.parts import Part, load_parts
from ahiq.data.registry import READERS, read_labels
from ahiq.data.splits import load_split, save_split, split_by_reference

__all__ = ["read_labels", "split_by_reference", "save_split", "load_split", "Pair", "Pairs", "DatasetError",
           "READERS", "TargetScale", "TrainPairs", "EvalPairs", "check_images", "check_parts", "ImageError", "image_size",
           "read_image", "EVAL_CROPS", "CropPlan", "eval_crop_positions", "Part", "load_parts"]
