"""Scoring with a trained model: the crop-ensemble core every path calls (``ensemble``), image files through
it grouped by reference (``inference``), ``Scorer`` (``scorer``) and scoring to CSV, journaled (``output``,
``journal``), the metric and loss on tensors (``metric``), quality maps (``maps``), the ONNX export
(``export``) and its torch-free scorer (``onnx_scorer``)."""
