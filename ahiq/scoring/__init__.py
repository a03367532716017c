"""Scoring with a trained model: the crop-ensemble core every path calls (``ensemble``), image files through
it grouped by reference (``inference``), ``Scorer`` and journaled scoring to CSV (``scorer``, ``journal``),
the metric and loss on tensors (``metric``), quality maps (``maps``)."""
