"""The Llama 2 tokenizer and Meta's chat format (``[INST]``, ``<<SYS>>``)."""
