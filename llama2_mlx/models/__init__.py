"""The Llama 2 network (``model.py``), its KV caches and LoRA layers."""
