"""AHIQ: Attention-based Hybrid Image Quality Assessment (Lao, Gong et al., CVPRW 2022)."""
import importlib

__version__ = "0.2.0"
__all__ = ["AHIQ", "AHIQMetric", "Scorer", "create_metric", "list_models"]
_HOMES = {"AHIQ": "model", "AHIQMetric": "metric", "Scorer": "scorer", "create_metric": "metric", "list_models": "metric"}


def __getattr__(name: str):
    """The public names, imported on first use: torch loads only when one is used, so that ``python -m ahiq
    --help`` and ``python -m ahiq zoo`` answer at once."""
    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module 'ahiq' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
