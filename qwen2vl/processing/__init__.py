"""Turning messages, text, images and videos into token ids and pixel tensors for the model."""
