"""``llmlb sim``: a cheap vLLM-compatible model-server simulator (see docs/sim.md).

- :mod:`llmlb.sim.kv_cache`: paged KV cache with automatic prefix caching (pure logic);
- :mod:`llmlb.sim.engine`: continuous batching, chunked prefill, step timing, counters;
- :mod:`llmlb.sim.protocol`: OpenAI request parsing, vLLM-shaped response bodies;
- :mod:`llmlb.sim.metrics`: the vLLM ``/metrics`` page;
- :mod:`llmlb.sim.server`: the aiohttp routes, failure injection and the process's life.
"""
