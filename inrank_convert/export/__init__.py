"""Out of the artifact into what other tools load: a dense Hugging Face folder (``dense``), a PEFT
LoRA adapter (``peft_plan`` decides, ``peft_adapter`` writes), the part of it vLLM serves
(``vllm_plan``), and the adapter's perplexity check (``adapter_check``)."""
