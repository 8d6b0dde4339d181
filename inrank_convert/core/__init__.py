"""What every stage needs and nothing else: errors a user can act on (``errors``), one definition of
a tensor's dtype names, bytes and hashes (``tensors``), devices and torchrun processes
(``distributed``), Hugging Face hub ids read offline (``hub``), and the version (``version``).

The bottom layer: it imports nothing of the package.
"""
