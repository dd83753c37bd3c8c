"""The hosted model: the backbone, its loading, chat template and forward pass, generation,
steering, the trained safety prompt, its embeddings and CPU threading."""
