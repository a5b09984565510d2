"""``python -m chorus_mq.cli``: the same as the ``chorus-mq`` script (tests and benchmarks start it so)."""

from chorus_mq.cli import main

if __name__ == "__main__":
    main()
