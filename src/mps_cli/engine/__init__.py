"""The engine: tokenizer, preprocessing, the network and the scorer."""
