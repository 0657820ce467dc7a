"""The HTTP server: Ollama- and OpenAI-compatible routes in front of one in-process engine."""
