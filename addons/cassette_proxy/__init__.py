"""cassette-proxy: record LLM inference traffic into cassettes and replay it offline."""

__version__ = "0.1.0"
