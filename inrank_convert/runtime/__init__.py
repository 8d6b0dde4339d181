"""Running from an artifact: a Hugging Face model with ``LowRankLinear`` where the factors pay
(``modeling``), and perplexity and generation on it (``evaluate``)."""
