"""The machinery of the ``mixed_precision_search`` pass (:mod:`vitqc.passes.mixed_precision_search`): genes,
budget, fitness, evolution and the table it prints."""
