"""The OpenAI-compatible HTTP front end: routes, schemas, video decoding, metrics."""
