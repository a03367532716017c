"""Experiments: training (``training``), test.py's driver (``testing``), the experiment folder (``experiment``),
correlations with MOS (``correlations``) and what a test writes (``results``)."""
