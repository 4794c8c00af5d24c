"""Training side of seqserve: corpora, tokenizers, PyTorch models, reference decoders, the training loop."""
