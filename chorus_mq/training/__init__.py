"""Client-side federated fine-tuning: data, the exact starting model, local LoRA training, DP-SGD,
the round driver behind ``chorus-mq train``, ``export``, and ``simulate --model``.

Importing this package (or :mod:`chorus_mq.cli.train`) imports no torch or transformers:
the heavy modules are imported where they are used, so ``chorus-mq --help`` stays fast.
"""
