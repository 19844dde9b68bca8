"""Phoenix Gateway: an OpenAI-compatible gateway in front of Ollama, OpenAI and Gemini."""

__version__ = "0.1.0"
