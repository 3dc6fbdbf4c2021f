"""The OpenAI-compatible HTTP gateway: a front door that turns OpenAI requests into jobs."""
