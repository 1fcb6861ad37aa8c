"""cllm-http: the HTTP face of cllmd, a separate process talking to the daemon over ZeroMQ.

``cllm.http.bridge`` (the daemon seen from asyncio), ``cllm.http.openai_api`` (OpenAI-compatible
requests and replies), ``cllm.http.metrics`` (Prometheus), ``cllm.http.app`` (the aiohttp
server, auth and ``main``), ``static/`` (the dashboard). Needs the extra: pip install 'cllmd[http]'.
"""
