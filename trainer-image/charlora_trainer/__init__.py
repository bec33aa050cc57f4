"""The trainer program: a dataset and a base model in, versioned character-LoRA artifacts in object storage out.

Runs as one GPU ``batch/v1`` Job per version (built into the image defined by ``trainer-image/Dockerfile``).
"""

__version__ = "0.1.0"
