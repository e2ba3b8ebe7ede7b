"""hangup: a reverse proxy for OpenAI-compatible LLM APIs that hangs up on the upstream
the moment nobody is waiting for the answer any more."""

__version__ = "0.1.0"
