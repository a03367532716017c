"""AHIQ: Attention-based Hybrid Image Quality Assessment (Lao, Gong et al., CVPRW 2022)."""
from .metric import AHIQMetric, create_metric
from .model import AHIQ
from .scorer import Scorer

__all__ = ["AHIQ", "AHIQMetric", "Scorer", "create_metric"]
__version__ = "0.2.0"
