"""LLM inference service: `modelworks.llm.v1.LLMService` over a continuous-batching engine."""
