"""The network and its weight files: the model (``model``), its parts (``backbones``, ``fusion``, ``head``),
reading and writing weights (``weights``), the released files and where they are found (``zoo``, no torch),
fetching and verifying them (``downloads``, no torch), and the official compute pattern (``official``: the
slow reference for tests and benchmarks)."""
