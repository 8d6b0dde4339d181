"""Pure linear algebra on one update ``delta`` [rows, cols]: no files, no models, no printing.

- ``criteria``: rank rules (energy, InRank's explained variance, a fixed rank, the numerical rank);
- ``svd``, ``gram``, ``randomized``: the exact SVD, the Gram engine, the adaptive randomized engine;
- ``factorize``: one update's truncated SVD, the engine chosen for it;
- ``forms``: the stored form (zero, low rank, low rank + rows, dense) that meets the rule cheapest;
- ``stored_error``: the error of what a reader gets back; ``budget``: ranks and rows under a byte
  budget; ``whitening``: the update factorized for a layer's output error on calibration inputs.
"""
