"""Attention transfer: fit ``lightning`` heads to imitate a model's softmax heads, convert the best.

``capture.py`` records every layer's post-RoPE q/k/v on calibration text (dense model);
``fit.py`` fits one KV head's Hedgehog feature maps and decay to its softmax outputs and measures
the held-out error; ``convert.py`` turns fitted heads into a plan; ``cli.py`` is
``headwise linearize``.
"""
