"""Encoders and decoders. ``coders.coder`` states the contract every coder obeys."""
