"""Full-reference IQA datasets as distributed: labels, reference-disjoint splits, paired crops. Importing this
package loads no torch (the names below come from their modules on first use): the crops, images, labels and
pairs modules serve the torch-free ONNX scorer."""
from ahiq.lazy import exports

_HOMES = {
    "ahiq.data.crops": ("EVAL_CROPS", "CropPlan", "eval_crop_positions"),
    "ahiq.data.datasets": ("EvalPairs", "TargetScale", "TrainPairs"),
    "ahiq.data.images": ("ImageError", "image_size", "read_image"),
    "ahiq.data.labels": ("read_labels",),
    "ahiq.data.pairs": ("DatasetError", "Pair", "Pairs", "check_images", "check_parts", "pair_files", "pairs_from_csv"),
    "ahiq.data.parts": ("Part", "Parts", "load_parts"),
    "ahiq.data.splits": ("load_split", "save_split", "split_by_reference"),
}
__all__ = [name for names in _HOMES.values() for name in names]
__getattr__, __dir__ = exports(__name__, {name: module for module, names in _HOMES.items() for name in names})
