"""AHIQ: Attention-based Hybrid Image Quality Assessment (Lao, Gong et al., CVPRW 2022)."""
from .model import AHIQ
from .scorer import Scorer

__all__ = ["AHIQ", "Scorer"]
__version__ = "0.1.0"
