"""AHIQ: Attention-based Hybrid Image Quality Assessment (Lao, Gong et al., CVPRW 2022)."""
from .model import AHIQ

__all__ = ["AHIQ"]
__version__ = "0.1.0"
