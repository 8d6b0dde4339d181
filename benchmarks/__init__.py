"""Benchmarks for inrank-convert (``make bench`` runs ``python -m benchmarks``).

Each benchmark measures its baseline in the same run and reports a ratio against it:

- ``compress``: compress wall time vs a plain streaming read of the same two checkpoints;
- ``svd``: adaptive randomized vs exact SVD on a 4096x4096 low-rank update;
- ``memory``: peak RSS of the CLI compressing a >= 1 GB pair vs 2 x largest tensor + 1 GiB;
- ``runtime``: forward speed and peak memory of ``load_compressed`` (factored, merged) vs dense;
- ``train``: time of one optimizer step of InRank-Efficient (MLP at width n/3, GPT-2 small) vs dense, same model and batch;
- ``compression``: bytes and perplexity of the stored forms (version-1 rule, --no-embeddings, the
  default, --quantize int8) vs dense on a GPT-2 trained on Tiny Shakespeare (needs ../shared/data).
"""
