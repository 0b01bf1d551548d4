"""A MaxText-style LLM trainer in JAX with research architectures built in."""
