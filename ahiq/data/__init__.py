"""Full-reference IQA datasets as distributed: labels, reference-disjoint splits, paired crops."""
from .datasets import EvalPairs, TargetScale, TrainPairs, check_images, check_parts
from .images import ImageError, image_size, read_image
from .labels import DatasetError, Pair, Pairs
from .parts import Part, load_parts
from .registry import READERS, read_labels
from .splits import load_split, save_split, split_by_reference
from .transforms import EVAL_CROPS, CropPlan, eval_crop_positions

__all__ = ["read_labels", "split_by_reference", "save_split", "load_split", "Pair", "Pairs", "DatasetError",
           "READERS", "TargetScale", "TrainPairs", "EvalPairs", "check_images", "check_parts", "ImageError", "image_size",
           "read_image", "EVAL_CROPS", "CropPlan", "eval_crop_positions", "Part", "load_parts"]
