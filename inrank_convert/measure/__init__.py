"""Measuring what compression keeps: spectra (``analysis``, the ``spectrum`` command), size and
perplexity (``report``, ``sweep``), two training runs (``compare_runs``), an artifact's integrity
(``verify``), and every plot (``plots``)."""
