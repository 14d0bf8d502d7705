"""Textual-inversion embeddings: new tokens whose rows of the token-embedding table are learnt (pivotal tuning) or
loaded from a file (A1111 / kohya, diffusers). Backend-neutral: numpy and the standard library."""
