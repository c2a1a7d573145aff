"""`llm serve`: an OpenAI-compatible HTTP server for the pipeline's models (docs/serving.md).

Modules: `loading` (model directory → model and kind), `engine` (continuous batching), `slots` (the shared KV
cache of the running sequences), `protocol` (request validation, response bodies), `app` (routes, errors),
`server` (uvicorn, signals). The web stack is imported only by `llm serve`.
"""
