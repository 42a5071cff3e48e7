"""An OpenAI-compatible HTTP server over the engine (launch/serve.py)."""
