"""Files of weights on disk: checkpoints read lazily one tensor at a time (``checkpoints``), their
sha256 remembered (``hash_cache``), outputs written whole or not at all (``outputs``), and the
training-run folder's layout (``run_folder``, its one owner)."""
