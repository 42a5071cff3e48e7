"""An OpenAI-compatible HTTP server over the continuous batcher (launch/serve.py)."""
