"""Encoder and decoder networks: plain ``nn.Module``s that know nothing of Lightning."""
