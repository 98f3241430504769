"""The OpenAI contract: request parsing and params, response bodies, SSE events, HTTP errors."""
