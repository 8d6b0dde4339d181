"""Compress, stage by stage: the per-tensor ``plan``; each update streamed in (``updates``); the
optional ``calibration`` on text (``calibrate_checkpoint``); a size target's allocation
(``targets``); each tensor factorized and stored (``execution``); the whole ``job`` and its
``results``; a ``perplexity_target`` searched over sizes; and under torchrun the tensors shared out
(``torchrun_schedule``) and carried between processes (``torchrun``)."""
