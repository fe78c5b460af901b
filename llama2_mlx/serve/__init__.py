"""``llama2 serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn).

``protocol`` validates requests and builds the OpenAI error objects and responses,
``batch`` holds the KV caches of the sequences decoding as one batch, ``prompt_cache``
the LRU of prompt prefixes kept across requests, ``engine`` the one thread that runs
every model call (admission, prefill, one batched decode step per iteration), ``app``
the FastAPI endpoints and ``server`` the loading of the models and the uvicorn loop.
"""
