"""Files and the terminal: atomic writes, checked readers, the Hugging Face hub, progress."""
