"""Toy-prior tools: training (`python -m tools.toy.train`) and the quality report (`python -m tools.toy.report`)."""
