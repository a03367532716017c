"""AHIQ: Attention-based Hybrid Image Quality Assessment (Lao, Gong et al., CVPRW 2022).

The package in layers, each importing only those below it: ``registry`` (every kind of choice, declared once),
``files``, ``messages``, ``options`` and ``lazy`` (shared, no torch); ``data`` (datasets, images, crops) and ``nn`` (the network and its weight files), which
do not import each other; ``runtime`` (devices, threads, signals, torchrun); ``scoring`` (the crop ensemble,
the scorer, the metric, maps); ``engine`` (training, test.py, the experiment folder, results); ``cli`` (the command lines) and ``app``
(the web page).
"""
from ahiq.lazy import exports

__version__ = "0.2.0"
_PUBLIC = {"AHIQ": "ahiq.nn.model", "AHIQMetric": "ahiq.scoring.metric", "Scorer": "ahiq.scoring.scorer",
           "create_metric": "ahiq.scoring.metric", "list_models": "ahiq.scoring.metric"}
__all__ = list(_PUBLIC)
__getattr__, __dir__ = exports(__name__, _PUBLIC)
