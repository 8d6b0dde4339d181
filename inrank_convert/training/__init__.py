"""Training and resuming with InRank: the options a run records (``options``), incremental rank
control (``rank_control``), the loop (``loop``), what a step folder holds (``checkpoint``), and the
entry points ``train`` and ``resume`` (``entrypoints``)."""
