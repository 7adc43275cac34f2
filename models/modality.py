"""Modality ids: which expert a sequence position goes through, in every family and in packed batches.

``modality`` tensors hold these values per position (int64, (B, L)); a multi-expert decoder routes
each position through the weights of its modality.
"""
TEXT = 0  # text tokens, the BOI / EOI markers and padding
IMAGE = 1  # image positions: VAE-latent patches (LlamaFusion / Transfusion), SigLIP visual tokens (MetaMorph)
